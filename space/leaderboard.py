"""The Leaderboard tab's data: the votes (this Space's log, and the Hub vote dataset's files when one is configured)
rated by space.ratings, the headline figures of compare's report, and the fair pairs of blind compares.

    sources = VoteSources(Path("votes/votes.jsonl"), hub_repo_id="alice/finetome-votes")
    board, note = sources.leaderboard()              # the Hub's files re-read at most once a minute
    headers, rows = report_headlines(load_report("reports/compare.json"))
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from common.cli import first_line
from common.formats import format_number, format_size
from space.ratings import Leaderboard, leaderboard, parse_votes
from space.replies import UserError
from space.round import fair_pair

__all__ = ["HUB_FOLDER", "REPORT_FILE", "VoteSources", "fair_pair", "hub_vote_texts", "load_report",
           "report_caption", "report_file", "report_headlines"]

HUB_FOLDER = "votes"  # where space.votes.VoteLog's CommitScheduler puts the vote files in the dataset
HUB_EVERY_S = 60.0  # the scheduler pushes every 10 minutes: a minute-old copy of the Hub's files is fresh enough
REPORT_FILE = "compare.json"  # what scripts/compare.py --out DIR writes (compare/report.py)


def hub_vote_texts(client, repo_id: str) -> dict[str, str]:
    """Every votes/*.jsonl of the Hub dataset `repo_id`, name in the repo -> text. `client` has HfApi's interface;
    hf_hub_download keeps each file in the huggingface_hub cache and fetches it again only when it changed."""
    names = sorted(name for name in client.list_repo_files(repo_id, repo_type="dataset")
                   if name.startswith(f"{HUB_FOLDER}/") and name.endswith(".jsonl"))
    return {name: Path(client.hf_hub_download(repo_id, name, repo_type="dataset")).read_text(encoding="utf-8",
                                                                                          errors="replace")
            for name in names}


def _hub_client():
    from huggingface_hub import HfApi  # only Spaces with a vote dataset need the Hub client

    return HfApi()  # the Space's HF_TOKEN secret, when it has one: a private dataset needs it


class VoteSources:
    """The votes the Leaderboard rates: this Space's own log and, with `hub_repo_id`, the vote files in that Hub
    dataset (earlier runs of the Space, whose local disk a restart wiped), read at most every `hub_every_s` seconds.

    The local log's own copy on the Hub (pushed every few minutes) is replaced by the log itself, which is newer; a
    last line without its newline is still being written and waits for the next read. A Hub that cannot be read
    leaves the local votes and a note saying why, never an error.
    """

    def __init__(self, log_path: Path, hub_repo_id: str | None = None,
                 client_factory: Callable[[], object] = _hub_client, hub_every_s: float = HUB_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.log_path, self.hub_repo_id = Path(log_path), hub_repo_id
        self._client_factory, self._client = client_factory, None
        self.hub_every_s, self._clock = hub_every_s, clock
        self._hub_texts: dict[str, str] = {}
        self._hub_read_at: float | None = None
        self._hub_note: str | None = None
        self._rated: tuple[int, Leaderboard] | None = None  # (fingerprint of the texts, their leaderboard)
        self._lock = threading.Lock()  # Gradio runs handlers in threads: one refresh at a time

    def _read_hub(self) -> None:
        self._hub_read_at = self._clock()
        try:
            self._client = self._client or self._client_factory()
            self._hub_texts, self._hub_note = hub_vote_texts(self._client, self.hub_repo_id), None
        except Exception as error:  # noqa: BLE001 - offline, a refused token, a missing dataset: say so, rate the rest
            self._hub_note = (f"The votes in the Hub dataset {self.hub_repo_id} could not be read "
                              f"({first_line(error)}): showing {'the last ones read and ' * bool(self._hub_texts)}"
                              "this Space's own.")

    def texts(self) -> tuple[dict[str, str], str | None]:
        """Every vote file's text by name, and a note when the Hub could not be read."""
        texts = {}
        if self.hub_repo_id:
            if self._hub_read_at is None or self._clock() - self._hub_read_at >= self.hub_every_s:
                self._read_hub()
            texts.update(self._hub_texts)
        try:
            local = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:  # no vote yet
            local = ""
        texts[f"{HUB_FOLDER}/{self.log_path.name}"] = local[: local.rfind("\n") + 1]
        return texts, self._hub_note

    def leaderboard(self) -> tuple[Leaderboard, str | None]:
        """The leaderboard of every vote (recomputed only when a vote file changed), and the Hub's note, if any."""
        with self._lock:
            texts, note = self.texts()
            fingerprint = hash(tuple(sorted(texts.items())))
            if self._rated is None or self._rated[0] != fingerprint:
                self._rated = fingerprint, leaderboard(parse_votes(texts))
            return self._rated[1], note


def report_file(path: str | Path) -> Path:
    """The report file a --report PATH names: compare.json itself, or the folder scripts/compare.py wrote it into."""
    path = Path(path).expanduser()
    return path / REPORT_FILE if path.is_dir() else path


def load_report(path: str | Path) -> dict:
    """compare's report (compare.json, or the folder scripts/compare.py wrote it into), checked to hold the models'
    figures the tab shows; UserError naming the file and the fix."""
    path = report_file(path)
    fix = f"give the {REPORT_FILE} that `python scripts/compare.py --out DIR` wrote (or DIR)"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"--report {path}: cannot read it ({first_line(error)}); {fix}") from error
    except ValueError as error:
        raise UserError(f"--report {path}: not JSON ({first_line(error)}); {fix}") from error
    models = report.get("models") if isinstance(report, dict) else None
    if not isinstance(models, list) or not models or not all(
            isinstance(model, dict) and isinstance(model.get("label"), str) and isinstance(model.get("heldout"), dict)
            and isinstance(model.get("generation"), dict) for model in models):
        raise UserError(f"--report {path}: not a compare report (it needs `models`, each with a label, held-out and "
                        f"generation figures); {fix}")
    return report


def report_headlines(report: Mapping) -> tuple[list[str], list[list[str]]]:
    """The report's headline figures, one column per model: headers and rows.

    >>> report_headlines({"models": [{"label": "1B", "size_bytes": 807_694_464, "heldout": {"perplexity": 7.314},
    ...                               "generation": {"tokens_per_s_median": 27.04, "eot_share": 0.9}}]})[1]
    [['Held-out perplexity (lower is better)', '7.31'], ['Tokens/s, median', '27.0'],
     ['Answers ending with <|eot_id|>', '90%'], ['GGUF size', '0.81 GB']]
    """
    models = report["models"]
    held_out, generation = [m["heldout"] for m in models], [m["generation"] for m in models]
    return ["", *(model["label"] for model in models)], [
        ["Held-out perplexity (lower is better)", *(format_number(h.get("perplexity")) for h in held_out)],
        ["Tokens/s, median", *(format_number(g.get("tokens_per_s_median"), "{:.1f}") for g in generation)],
        ["Answers ending with <|eot_id|>", *(format_number(g.get("eot_share"), "{:.0%}") for g in generation)],
        ["GGUF size", *(format_size(m.get("size_bytes")) for m in models)],
    ]


def report_caption(report: Mapping) -> str:
    """Where the figures come from, in one line.

    >>> report_caption({"created": "2026-01-02 10:00 UTC", "machine": {"cpu": "AMD EPYC 7B13"}, "models": [{}, {}]})
    'Measured by `scripts/compare.py` on 2026-01-02 10:00 UTC on AMD EPYC 7B13: 2 models, as the Space serves them.'
    """
    machine = report.get("machine") or {}
    return (f"Measured by `scripts/compare.py` on {report.get('created', 'an unknown date')} on "
            f"{machine.get('cpu', 'an unknown CPU')}: {len(report['models'])} models, as the Space serves them.")
