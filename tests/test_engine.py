"""The Space's pure logic beside the engine, table-driven: Gradio history → messages, trimming, sampling bounds,
Replies, the catalog, and the vote log with a recorded CommitScheduler. The engine serving the real tiny model:
tests/test_serving.py."""

import json
import math
import random
import threading
from datetime import datetime
from types import SimpleNamespace

import pytest

from space.catalog import ModelSpec, catalog_from_paths, load_catalog
from space.engine import Engine
from space.history import flatten_content, history_to_messages, prompt_text, trim_history
from space.replies import Reply, Sampling, UserError
from space.votes import VoteLog, unique_vote_file

GREEDY = Sampling(temperature=0, max_new_tokens=16)


# ---------------------------------------------------------------------- Gradio history → messages
@pytest.mark.parametrize("content, expected", [
    ("plain", "plain"),
    ([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "a\nb"),
    ([{"type": "file", "file": {"path": "/tmp/x.png", "mime_type": "image/png"}},
      {"type": "text", "text": "what is this?"}], "what is this?"),
    ({"type": "text", "text": "one block"}, "one block"),
    ({"text": "multimodal textbox value", "files": ["/tmp/x.png"]}, "multimodal textbox value"),
    ({"path": "/tmp/x.png"}, ""),
    ({"type": "component", "component": "image", "value": "x", "constructor_args": {}, "props": {}}, ""),
    ([SimpleNamespace(type="text", text="pydantic-like")], "pydantic-like"),
    (None, ""),
    ([], ""),
])
def test_flatten_content(content, expected):
    assert flatten_content(content) == expected


def test_history_to_messages_on_gradio_6_shapes():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "  Hi  "}], "metadata": None, "options": None},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}], "metadata": None},
        {"role": "assistant", "content": "stats panel", "metadata": {"title": "⏱ 0.1 s"}},  # a Gradio "thought"
        {"role": "user", "content": [{"type": "file", "file": {"path": "/tmp/cat.png"}}]},  # image only: no text
        {"role": "system", "content": "not from the history"},
        {"role": "tool", "content": "nor this"},
        {"role": "assistant", "content": ""},
        SimpleNamespace(role="user", content="as an object", metadata=None),
        {"role": "assistant", "content": "half a pair: \ud800"},  # comes back every turn: mended, not refused
    ]
    assert history_to_messages(history) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "as an object"},
        {"role": "assistant", "content": "half a pair: \ufffd"},
    ]


@pytest.mark.parametrize("history", [None, [], ()])
def test_no_history_is_an_empty_conversation(history):
    assert history_to_messages(history) == []


@pytest.mark.parametrize("history, expected", [
    ("not a list", "The conversation history must be a list of messages, not str; send [] to start a new one."),
    ({"role": "user"}, "must be a list of messages, not dict"),
    (42, "must be a list of messages, not int"),
    ([{"role": "user", "content": "Hi"}, "garbage"], "Message 2 of the conversation history is a str, not a "),
    ([None], "Message 1 of the conversation history is a NoneType"),
])
def test_history_of_the_wrong_shape_is_one_line(history, expected):
    with pytest.raises(UserError) as error:
        history_to_messages(history)
    assert expected in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("value, expected", [
    (None, ""),
    ("  text  ", "text"),
    ({"text": "multimodal", "files": []}, "multimodal"),
    ("<|eot_id|>", "<|eot_id|>"),  # special-token strings are text like any other
])
def test_prompt_text_accepts_text(value, expected):
    assert prompt_text(value, "message") == expected


@pytest.mark.parametrize("value, expected", [
    (42, "Your message must be text, not int; send it as a string."),
    (3.5, "Your message must be text, not float"),
    (b"bytes", "Your message must be text, not bytes"),
    ("ok\ud800", "Your message holds U+D800 at character 3, half of a UTF-16 surrogate pair and not valid Unicode; "
                  "remove it and send again."),
    ("\udfff", "Your message holds U+DFFF at character 1"),
])
def test_prompt_text_refuses_what_is_not_text(value, expected):
    with pytest.raises(UserError) as error:
        prompt_text(value, "message")
    assert str(error.value).startswith(expected)


# ---------------------------------------------------------------------- trimming
def _chat(system: bool, turns: int, first_role: str = "user") -> list[dict]:
    roles = ["user", "assistant"] if first_role == "user" else ["assistant", "user"]
    head = [{"role": "system", "content": "S"}] if system else []
    body = [{"role": roles[i % 2], "content": f"{roles[i % 2][0]}{i // 2}"} for i in range(2 * turns)]
    return head + body + [{"role": "user", "content": "new"}]


def _contents(messages):
    return [message["content"] for message in messages]


def count_messages(messages):  # one "token" per message keeps the arithmetic readable
    return len(messages)


@pytest.mark.parametrize("system, turns, n_ctx, max_new, expected", [
    (True, 3, 100, 10, ["S", "u0", "a0", "u1", "a1", "u2", "a2", "new"]),  # fits: unchanged
    (True, 3, 8, 2, ["S", "u1", "a1", "u2", "a2", "new"]),  # oldest exchange first
    (True, 3, 6, 2, ["S", "u2", "a2", "new"]),
    (True, 3, 4, 2, ["S", "new"]),  # all history gone, system and new message kept
    (False, 3, 5, 2, ["u2", "a2", "new"]),
    (False, 0, 3, 2, ["new"]),
])
def test_trim_history_drops_oldest_exchanges(system, turns, n_ctx, max_new, expected):
    assert _contents(trim_history(_chat(system, turns), count_messages, n_ctx, max_new)) == expected


@pytest.mark.parametrize("n_ctx, expected", [
    (100, ["S", "u0", "a0", "u1", "a1", "u2", "a2", "u3", "a3", "new"]),  # nothing to drop: no step either
    (10, ["S", "u2", "a2", "u3", "a3", "new"]),  # one exchange needed, two dropped
    (8, ["S", "u2", "a2", "u3", "a3", "new"]),  # two needed: the same start as above, so the same prefix
    (6, ["S", "new"]),  # three needed, four dropped
])
def test_trim_history_drops_in_steps(n_ctx, expected):
    assert _contents(trim_history(_chat(True, 4), count_messages, n_ctx, 1, drop_step=2)) == expected


def test_trim_history_keeps_whole_exchanges():
    # A history that opens with the assistant (a greeting): it goes with the first drop, never half an exchange.
    chat = _chat(False, 2, first_role="assistant")  # a0 u0 a1 u1 new
    assert _contents(trim_history(chat, count_messages, 5, 1)) == ["u0", "a1", "u1", "new"]
    assert _contents(trim_history(chat, count_messages, 4, 1)) == ["u1", "new"]


def test_trim_history_matches_dropping_one_exchange_at_a_time():
    def naive(messages, count, n_ctx, max_new):
        start = 1 if messages[0]["role"] == "system" else 0
        history = messages[start:-1]
        while history and count(messages[:start] + history + messages[-1:]) + max_new > n_ctx:
            history = history[1:]
            while history and history[0]["role"] != "user":
                history = history[1:]
        return messages[:start] + history + messages[-1:]

    def count_characters(messages):
        return sum(len(message["content"]) for message in messages)

    generator = random.Random(0)
    for _ in range(200):
        chat = [{"role": "system", "content": "x" * generator.randint(1, 5)}] + [
            {"role": generator.choice(["user", "user", "assistant"]), "content": "y" * generator.randint(1, 20)}
            for _ in range(generator.randint(0, 12))] + [{"role": "user", "content": "z" * generator.randint(1, 9)}]
        n_ctx = generator.randint(20, 150)
        expected = naive(chat, count_characters, n_ctx, 5)
        if count_characters(expected) + 5 > n_ctx:
            with pytest.raises(UserError):
                trim_history(chat, count_characters, n_ctx, 5)
        else:
            assert trim_history(chat, count_characters, n_ctx, 5) == expected


@pytest.mark.parametrize("system, message, expected", [
    ("S", "x" * 50, "Your message is too long for this model's context: the prompt comes to 51 tokens where 30 fit "
                    "(10 more are kept for the answer); shorten it by 21 tokens."),
    ("", "x" * 50, "Your message is too long for this model's context: the prompt comes to 50 tokens where 30 fit"),
    ("S" * 50, "Hi", "Your system prompt is too long for this model's context: the prompt comes to 52 tokens where "
                     "30 fit (10 more are kept for the answer); shorten it by 22 tokens."),
    ("S" * 20, "x" * 20, "Your system prompt and message are too long for this model's context: the prompt comes to "
                         "40 tokens where 30 fit (10 more are kept for the answer); shorten them by 10 tokens."),
])
def test_a_prompt_too_long_names_the_part_and_by_how_much(system, message, expected):
    chat = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": "old"}, {"role": "assistant", "content": "history goes first"},
        {"role": "user", "content": message}]
    with pytest.raises(UserError) as error:
        trim_history(chat, lambda messages: sum(len(m["content"]) for m in messages), n_ctx=40, max_new_tokens=10)
    assert str(error.value).startswith(expected)


# ---------------------------------------------------------------------- sampling
@pytest.mark.parametrize("given, expected", [
    (Sampling(), Sampling(0.7, 0.9, 256)),
    (Sampling(0.0, 0.05, 16), Sampling(0.0, 0.05, 16)),
    (Sampling(-5, 7, 10**9), Sampling(0.0, 1.0, 1024)),
    (Sampling(99, 0, 1), Sampling(2.0, 0.05, 16)),
    (Sampling(None, None, None), Sampling(0.7, 0.9, 256)),
    (Sampling(1, 1, 100.9), Sampling(1.0, 1.0, 100)),
    (Sampling(0.5, 0.5, 10**400), Sampling(0.5, 0.5, 1024)),
])
def test_sampling_clamped(given, expected):
    clamped = given.clamped()
    assert clamped == expected
    assert isinstance(clamped.max_new_tokens, int) and not math.isnan(clamped.temperature)


@pytest.mark.parametrize("given, expected", [
    (Sampling(float("nan"), 0.9, 256), "Temperature must be a finite number from 0 to 2, not nan."),
    (Sampling(0.7, float("-inf"), 256), "top_p must be a finite number from 0.05 to 1, not -inf."),
    (Sampling(0.7, 0.9, float("inf")), "Max new tokens must be a finite number from 16 to 1024, not inf."),
    (Sampling("hot", 0.9, "many"), "Temperature must be a number from 0 to 2, not 'hot'; Max new tokens must be a "
                                   "number from 16 to 1024, not 'many'."),
    (Sampling(True, [1], {"a": 1}), "Temperature must be a number from 0 to 2, not True; top_p must be a number "
                                    "from 0.05 to 1, not [1]; Max new tokens must be a number from 16 to 1024, not "
                                    "{'a': 1}."),
])
def test_sampling_that_is_not_a_finite_number_names_every_setting(given, expected):
    with pytest.raises(UserError) as error:
        given.clamped()
    assert str(error.value) == expected


def test_reply_stats():
    assert Reply("").stats() == ""
    assert Reply("", status="Model 3B is answering 4 other conversations; you are number 2 in line.").stats() == (
        "Model 3B is answering 4 other conversations; you are number 2 in line.")
    assert Reply("x", ttft_s=0.123, tokens=57, tokens_per_s=34.49).stats() == "TTFT 0.12 s · 34.5 tok/s · 57 tokens"


# ---------------------------------------------------------------------- catalogs
def test_default_catalog_lists_the_1b_and_3b_models():
    specs = load_catalog(env={})
    assert [spec.label for spec in specs] == ["Llama-3.2-1B FineTome (q4_k_m)", "Llama-3.2-3B FineTome (q4_k_m)"]
    assert all(spec.repo_id.endswith("-Instruct-FineTome-GGUF") and spec.filename == "*Q4_K_M.gguf"
               and spec.path is None for spec in specs)


def test_space_models_env_overrides_the_yaml(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    models = [{"label": "Hub", "repo_id": "me/repo-GGUF", "filename": "*Q4_K_M.gguf"},
              {"label": "Local", "path": str(gguf)}]
    specs = load_catalog(tmp_path / "absent.yaml", env={"SPACE_MODELS": json.dumps(models)})
    assert specs == [ModelSpec("Hub", repo_id="me/repo-GGUF", filename="*Q4_K_M.gguf"),
                     ModelSpec("Local", path=str(gguf))]


def test_catalog_from_yaml_file(tmp_path):
    catalog = tmp_path / "models.yaml"
    catalog.write_text("models:\n  - label: Only\n    repo_id: me/x\n    filename: '*.gguf'  # comment\n")
    assert load_catalog(catalog, env={"SPACE_MODELS": "  "}) == [ModelSpec("Only", "me/x", "*.gguf")]


@pytest.mark.parametrize("models, expected", [
    ([], "non-empty list"),
    ({"label": "x"}, "non-empty list"),
    (["just a string"], "entry 1: expected a mapping"),
    ([{"repo_id": "me/x", "filename": "*.gguf"}], "entry 1: needs a label"),
    ([{"label": "A", "repo_id": "me/x"}], "entry 1 ('A'): repo_id and filename go together"),
    ([{"label": "A"}], "entry 1 ('A'): give one of repo_id + filename"),
    ([{"label": "A", "repo_id": "me/x", "filename": "*.gguf", "path": "a.gguf"}], "give one of repo_id"),
    ([{"label": "A", "path": "a.gguf", "repo": "typo"}], "unknown key(s) repo"),
    ([{"label": "A", "path": 3}], "path must be a non-empty string"),
    ([{"label": "A", "path": "a.gguf"}, {"label": "B", "path": "b.gguf"}, {"label": "A", "path": "c.gguf"}],
     "duplicate label(s) 'A'"),
])
def test_invalid_catalogs_name_the_entry(models, expected):
    with pytest.raises(UserError) as error:
        load_catalog(env={"SPACE_MODELS": json.dumps(models)})
    assert "SPACE_MODELS" in str(error.value) and expected in str(error.value)
    assert "\n" not in str(error.value)


def test_all_problems_reported_at_once():
    models = [{"label": "A"}, {"path": "x.gguf"}]
    with pytest.raises(UserError) as error:
        load_catalog(env={"SPACE_MODELS": json.dumps(models)})
    assert "entry 1 ('A')" in str(error.value) and "entry 2: needs a label" in str(error.value)


def test_unreadable_catalogs(tmp_path):
    with pytest.raises(UserError, match="not valid JSON"):
        load_catalog(env={"SPACE_MODELS": "[{label: 1B}]"})
    with pytest.raises(UserError, match="cannot read the model catalog"):
        load_catalog(tmp_path / "absent.yaml", env={})
    (tmp_path / "flat.yaml").write_text("- label: A\n  path: a.gguf\n")
    with pytest.raises(UserError, match="top-level `models:` list"):
        load_catalog(tmp_path / "flat.yaml", env={})


def test_catalog_from_paths(tmp_path):
    first = tmp_path / "Tiny-Llama-3.2-FineTome-Q4_K_M.gguf"
    other = tmp_path / "other" / first.name
    other.parent.mkdir()
    first.write_bytes(b"GGUF")
    other.write_bytes(b"GGUF")
    specs = catalog_from_paths([str(first), str(first), str(other)])
    assert [spec.label for spec in specs] == ["Tiny-Llama-3.2-FineTome-Q4_K_M", "Tiny-Llama-3.2-FineTome-Q4_K_M (2)",
                                              "Tiny-Llama-3.2-FineTome-Q4_K_M (3)"]
    assert [spec.path for spec in specs] == [str(first), str(first), str(other)]
    with pytest.raises(UserError, match=r"--model: no such file: .*missing\.gguf"):
        catalog_from_paths([str(first), str(tmp_path / "missing.gguf")])
    with pytest.raises(UserError, match="at least one"):
        catalog_from_paths([])


def test_engine_rejects_empty_or_ambiguous_catalogs():
    with pytest.raises(UserError, match="empty"):
        Engine([])
    with pytest.raises(UserError, match="repeats a label"):
        Engine([ModelSpec("A", path="a.gguf"), ModelSpec("A", path="b.gguf")])


# ---------------------------------------------------------------------- votes
def test_vote_log_appends_json_lines(tmp_path):
    log = VoteLog(tmp_path / "votes" / "deep" / "votes.jsonl")
    first = log.record("1B", "3B", "A", "Hi", "Hello", "Hey", blind=True)
    log.record("3B", "1B", "both bad", "Ünïcode ✓", "a\nb", "", blind=False)
    lines = (tmp_path / "votes" / "deep" / "votes.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert records[0] == first
    assert [record["vote"] for record in records] == ["A", "both bad"]
    assert records[1]["prompt"] == "Ünïcode ✓" and records[1]["answer_a"] == "a\nb" and records[1]["blind"] is False
    assert datetime.fromisoformat(first["timestamp"]).utcoffset().total_seconds() == 0
    assert set(first) == {"timestamp", "model_a", "model_b", "vote", "prompt", "answer_a", "answer_b", "blind"}


@pytest.mark.parametrize("vote", ["a", "C", "", None, "both"])
def test_vote_log_rejects_unknown_votes(tmp_path, vote):
    log = VoteLog(tmp_path / "votes.jsonl")
    with pytest.raises(UserError, match="choose one of: A, B, tie, both bad"):
        log.record("1B", "3B", vote, "Hi", "x", "y", blind=True)
    assert not (tmp_path / "votes.jsonl").exists()


def test_vote_log_pushes_with_a_commit_scheduler(tmp_path):
    class CountingLock:
        def __init__(self):
            self.entered, self._lock = 0, threading.Lock()

        def __enter__(self):
            self.entered += 1
            return self._lock.__enter__()

        def __exit__(self, *exc):
            return self._lock.__exit__(*exc)

    schedulers = []

    def factory(**arguments):
        schedulers.append(SimpleNamespace(arguments=arguments, lock=CountingLock()))
        return schedulers[-1]

    path = unique_vote_file(tmp_path / "votes")
    log = VoteLog(path, hub_repo_id="me/space-votes", every_minutes=5, scheduler_factory=factory)
    log.record("1B", "3B", "tie", "Hi", "x", "y", blind=True)
    (scheduler,) = schedulers
    assert scheduler.arguments == dict(repo_id="me/space-votes", repo_type="dataset", folder_path=path.parent,
                                       path_in_repo="votes", every=5)
    assert scheduler.lock.entered == 1 and log.scheduler is scheduler
    assert path.parent == tmp_path / "votes" and path.name.startswith("votes-") and path.suffix == ".jsonl"
    assert unique_vote_file(tmp_path) != unique_vote_file(tmp_path)


def test_vote_log_without_hub_repo_makes_no_scheduler(tmp_path):
    def factory(**arguments):
        raise AssertionError("no scheduler without hub_repo_id")

    assert VoteLog(tmp_path / "v.jsonl", scheduler_factory=factory).scheduler is None
