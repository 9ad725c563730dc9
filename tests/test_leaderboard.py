"""The Leaderboard tab's data (space/leaderboard.py): this Space's votes and the Hub vote dataset's, read through a
recording stand-in for HfApi (tests/hub_recorder.py); compare's report; the fair pairs of blind compares."""

import itertools
import json
import random
from collections import Counter
from types import SimpleNamespace

import pytest

from hub_recorder import RecordingClient, hub_error
from space.leaderboard import VoteSources, fair_pair, load_report, report_headlines
from space.replies import UserError

REPO_ID = "alice/finetome-votes"


def vote(model_a: str, model_b: str, choice: str) -> str:
    return json.dumps({"timestamp": "2026-01-01T00:00:00+00:00", "model_a": model_a, "model_b": model_b,
                       "vote": choice, "prompt": "Hi", "answer_a": "x", "answer_b": "y", "blind": True}) + "\n"


class VoteDataset(RecordingClient):
    """The recorder, plus hf_hub_download: the dataset's files (path in the repo -> text), each written where the
    huggingface_hub cache would keep it."""

    def __init__(self, files: dict[str, str], cache, **kwargs):
        super().__init__(existing=[".gitattributes", "README.md", *files], **kwargs)
        self.files, self.cache = files, cache

    def hf_hub_download(self, *args, **kwargs) -> str:
        call = self._record("hf_hub_download", args, kwargs)
        path = self.cache / call.arguments["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.files[call.arguments["filename"]])
        return str(path)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def log(tmp_path):
    """This Space's own vote file, named as space.votes.unique_vote_file names it when votes go to the Hub."""
    path = tmp_path / "votes" / "votes-20260102T100000-abcd1234.jsonl"
    path.parent.mkdir()
    return path


def test_the_hub_datasets_votes_and_this_spaces_own_are_rated_together(log, tmp_path):
    log.write_text(vote("1B", "3B", "B") * 2 + '{"model_a": "1B", "model_b": "3B", "vo')  # a line being written
    hub = VoteDataset({"votes/votes-20260101T080000-00000000.jsonl": vote("1B", "3B", "B") * 3 + "garbage\n",
                       f"votes/{log.name}": vote("1B", "3B", "B"),  # this Space's file as last pushed: older
                       "data/other.jsonl": vote("x", "y", "A")}, tmp_path / "cache")
    board, note = VoteSources(log, REPO_ID, client_factory=lambda: hub).leaderboard()
    assert note is None
    assert [(row.model, row.wins, row.losses) for row in board.ratings] == [("3B", 5, 0), ("1B", 0, 5)]
    assert board.votes.corrupt == 1 and board.votes.problems == (
        "votes/votes-20260101T080000-00000000.jsonl:4: not JSON",)
    assert [(call.method, call.arguments) for call in hub.calls] == [
        ("list_repo_files", {"repo_id": REPO_ID, "repo_type": "dataset"}),
        *(("hf_hub_download", {"repo_id": REPO_ID, "filename": name, "repo_type": "dataset"})
          for name in sorted(hub.files) if name.startswith("votes/"))]


def test_the_hub_is_read_at_most_once_a_minute_and_local_votes_show_at_once(log, tmp_path):
    clock = Clock()
    hub = VoteDataset({"votes/old.jsonl": vote("1B", "3B", "A")}, tmp_path / "cache")
    sources = VoteSources(log, REPO_ID, client_factory=lambda: hub, clock=clock)
    assert sources.leaderboard()[0].counted == 1
    first = sources.leaderboard()[0]
    assert sources.leaderboard()[0] is first  # nothing changed: not refitted
    log.write_text(vote("1B", "3B", "tie"))
    clock.now = 59
    assert sources.leaderboard()[0].counted == 2
    assert [call.method for call in hub.calls].count("list_repo_files") == 1
    hub.files["votes/old.jsonl"] += vote("1B", "3B", "A")
    clock.now = 61
    assert sources.leaderboard()[0].counted == 3
    assert [call.method for call in hub.calls].count("list_repo_files") == 2


def test_a_hub_that_cannot_be_read_leaves_a_note_and_the_local_votes(log, tmp_path):
    clock = Clock()
    log.write_text(vote("1B", "3B", "A"))
    hub = VoteDataset({"votes/old.jsonl": vote("1B", "3B", "A")}, tmp_path / "cache")
    sources = VoteSources(log, REPO_ID, client_factory=lambda: hub, clock=clock)
    assert sources.leaderboard() == (sources.leaderboard()[0], None) and sources.leaderboard()[0].counted == 2
    hub.fail = {"list_repo_files": hub_error(401, "Invalid credentials in Authorization header")}
    clock.now = 120
    board, note = sources.leaderboard()
    assert board.counted == 2  # the last Hub votes read are kept
    assert note.startswith(f"The votes in the Hub dataset {REPO_ID} could not be read (Client error '401 "
                           "Unauthorized'") and note.endswith("): showing the last ones read and this Space's own.")

    offline = VoteSources(log, REPO_ID, client_factory=lambda: VoteDataset(
        {}, tmp_path, fail={"list_repo_files": OSError("Network is unreachable")}))
    board, note = offline.leaderboard()
    assert board.counted == 1 and note.endswith("(Network is unreachable): showing this Space's own.")


def test_without_a_dataset_only_the_log_is_read_and_no_vote_yet_is_an_empty_board(log):
    sources = VoteSources(log, client_factory=lambda: pytest.fail("no dataset: the Hub is never asked"))
    assert sources.leaderboard()[0].ratings == []
    log.write_text(vote("1B", "3B", "both bad"))
    board, note = sources.leaderboard()
    assert note is None and board.both_bad == 1 and board.counted == 0


def test_blind_pairs_are_drawn_fairly():
    labels = ["1B", "3B", "1B base", "3B base"]
    rng = random.Random(0)
    draws = [fair_pair(labels, rng) for _ in range(6000)]
    assert all(a != b for a, b in draws)
    pairs = Counter(frozenset(draw) for draw in draws)
    assert set(pairs) == {frozenset(pair) for pair in itertools.combinations(labels, 2)}
    assert all(abs(count - 1000) < 120 for count in pairs.values()), pairs  # 1000 each, sd 29
    sides = Counter(a for a, _ in draws)
    assert all(abs(count - 1500) < 150 for count in sides.values()), sides  # each model on side A 1 time in 4


# ---------------------------------------------------------------------- compare's report
REPORT = {"created": "2026-01-02 10:00 UTC", "machine": {"cpu": "AMD EPYC 7B13"}, "models": [
    {"label": "1B", "size_bytes": 807_694_464, "heldout": {"perplexity": 9.871},
     "generation": {"tokens_per_s_median": 27.4, "eot_share": 1.0}},
    {"label": "3B", "size_bytes": 2_019_377_696, "heldout": {"perplexity": 7.502},
     "generation": {"tokens_per_s_median": 12.1, "eot_share": 0.9}},
    {"label": "server", "size_bytes": None, "heldout": {"perplexity": None, "not_scored": "no logits"},
     "generation": {"tokens_per_s_median": 30.0, "eot_share": 0.8}},
]}


def test_the_reports_headline_figures_side_by_side(tmp_path):
    (tmp_path / "compare.json").write_text(json.dumps(REPORT))
    headers, rows = report_headlines(load_report(tmp_path))  # the folder scripts/compare.py --out wrote
    assert headers == ["", "1B", "3B", "server"]
    assert rows == [["Held-out perplexity (lower is better)", "9.87", "7.50", "–"],
                    ["Tokens/s, median", "27.4", "12.1", "30.0"],
                    ["Answers ending with <|eot_id|>", "100%", "90%", "80%"],
                    ["GGUF size", "0.81 GB", "2.02 GB", "–"]]


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it"),
    ("{", "not JSON"),
    (json.dumps({"models": [{"label": "1B"}]}), "not a compare report"),
    (json.dumps([1, 2]), "not a compare report"),
])
def test_a_bad_report_is_one_line(tmp_path, content, message):
    path = tmp_path / "compare.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=f"^--report {path}: {message}") as raised:
        load_report(path)
    assert "\n" not in str(raised.value) and "scripts/compare.py --out DIR" in str(raised.value)


def test_the_leaderboard_tab_shows_the_report_and_offers_random_pairs(tmp_path):
    from space.app import build_app
    from space.votes import VoteLog

    def component(app, elem_id):
        return next(block for block in app.blocks.values() if getattr(block, "elem_id", None) == elem_id)

    three = build_app(SimpleNamespace(labels=["1B", "3B", "1B base"]), VoteLog(tmp_path / "v.jsonl"), report=REPORT)
    assert component(three, "report-table").value["data"][0] == ["Held-out perplexity (lower is better)", "9.87",
                                                                  "7.50", "–"]
    assert component(three, "compare-random").value is True and component(three, "compare-random").visible
    two = build_app(SimpleNamespace(labels=["1B", "3B"]), VoteLog(tmp_path / "v.jsonl"))
    assert component(two, "compare-random").value is False and not component(two, "compare-random").visible
    assert not any(getattr(block, "elem_id", None) == "report-table" for block in two.blocks.values())
