"""FineTome rows -> role/content messages -> token ids with assistant-only labels.

Pure functions, no model needed (a tokenizer for the last step). The flow:

    rows = read_rows("train/data/finetome_sample.jsonl")        # (row number, raw row or parse error)
    prepared = prepare(rows, seed=3407, eval_samples=10)        # standardise, filter, shuffle, split
    example = tokenize_conversation(messages, tokenizer)       # {"input_ids", "labels"}

FineTome-100k rows look like ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}],
"source": ..., "score": ...}. Rows already in {"messages": [{"role", "content"}]} form are accepted too.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from common.llama3 import TEMPLATE_DATE  # passed explicitly: the same token ids whatever the day (exact resume)

IGNORE_INDEX = -100  # what PyTorch's cross-entropy (and so every HF model) skips

# Roles as FineTome/ShareGPT spell them, and the chat-template role each becomes.
ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "system": "system",
}

class BadRow(ValueError):
    """A row that cannot be trained on; the message says why."""


class DataError(RuntimeError):
    """The dataset as a whole is unusable (missing file, nothing left after filtering)."""


@dataclass
class Prepared:
    train: list[list[dict[str, str]]]
    eval: list[list[dict[str, str]]]
    total_rows: int
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (row number, reason)
    below_min_score: int = 0

    def summary(self, show: int = 5) -> list[str]:
        lines = [f"data: {self.total_rows} rows read, {len(self.train)} train / {len(self.eval)} eval conversations"]
        if self.below_min_score:
            lines.append(f"data: {self.below_min_score} rows below --min-score dropped")
        if self.skipped:
            lines.append(f"data: skipped {len(self.skipped)} bad rows; first {min(show, len(self.skipped))}:")
            lines += [f"  row {number}: {reason}" for number, reason in self.skipped[:show]]
        return lines


# ---------------------------------------------------------------------- reading
def read_rows(dataset: str | Path, split: str = "train") -> Iterator[tuple[int, Any]]:
    """Yield (row number, row) pairs; a row that cannot be parsed is yielded as a BadRow.

    Row numbers are 1-based: the line number in a .jsonl file, the position otherwise.
    """
    from .config import resolve_local_path

    path = resolve_local_path(str(dataset))
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise DataError(f"dataset file not found: {path}")
        if suffix == ".jsonl":
            yield from _read_jsonl(path)
        elif suffix == ".json":
            yield from _read_json(path)
        else:
            import pyarrow.parquet as pq

            for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
                yield number, row
        return
    yield from _read_hub(str(dataset), split)


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                yield number, BadRow(f"unparseable JSON ({e.msg} at column {e.colno})")


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        yield from _read_jsonl(path)  # many ".json" files are really JSON Lines
        return
    if isinstance(data, dict):  # {"train": [...]} or a single row
        data = data.get("train", data.get("data", [data]))
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    yield from enumerate(data, start=1)


def _read_hub(dataset_id: str, split: str) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        data = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # offline, unknown repo, unknown split: one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"could not load dataset {dataset_id!r} (split {split!r}) from the Hub: {first}") from e
    yield from enumerate(data, start=1)


# ---------------------------------------------------------------------- standardising
def standardize_row(row: Any) -> list[dict[str, str]]:
    """One raw row -> [{"role", "content"}, ...] in system?, user, assistant, user, assistant... order.

    >>> standardize_row({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]})
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]
    """
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow(f"not an object (got {type(row).__name__})")
    if row.get("conversations") is not None:
        turns, role_key, text_key = row["conversations"], "from", "value"
    elif row.get("messages") is not None:
        turns, role_key, text_key = row["messages"], "role", "content"
    else:
        raise BadRow("missing field 'conversations' (or 'messages')")
    if not isinstance(turns, list) or not turns:
        raise BadRow("'conversations' is empty or not a list")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow(f"turn {index} is not an object")
        # Tolerate a row that mixes the two spellings, as some ShareGPT exports do.
        role = turn.get(role_key, turn.get("role" if role_key == "from" else "from"))
        text = turn.get(text_key, turn.get("content" if text_key == "value" else "value"))
        if role is None:
            raise BadRow(f"turn {index} has no '{role_key}'")
        if text is None:
            raise BadRow(f"turn {index} has no '{text_key}'")
        if role not in ROLE_ALIASES:
            raise BadRow(f"turn {index} has unknown role {role!r} (expected human, gpt or system)")
        if not isinstance(text, str) or not text.strip():
            raise BadRow(f"turn {index} has empty text")
        messages.append({"role": ROLE_ALIASES[role], "content": text})
    _check_order(messages)
    return messages


def _check_order(messages: list[dict[str, str]]) -> None:
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        raise BadRow("wrong order: a system turn may only come first")
    if "assistant" not in body:
        raise BadRow("no assistant (gpt) turn")
    for index, role in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise BadRow(f"wrong order: expected a {expected} turn at position {index + len(roles) - len(body)}, got {role}")
    if body[-1] != "assistant":
        raise BadRow("wrong order: the conversation ends with a user turn")


def prepare(
    rows: Iterable[tuple[int, Any]],
    *,
    seed: int,
    eval_samples: int = 0,
    max_samples: int | None = None,
    min_score: float | None = None,
) -> Prepared:
    """Standardise every row, drop bad ones, filter by score, shuffle with the seed, split off eval.

    The eval split is taken before --max-samples caps the training split, so changing --max-samples
    never moves a conversation from eval into training.
    """
    good, skipped, below, total = [], [], 0, 0
    for number, row in rows:
        total += 1
        try:
            messages = standardize_row(row)
        except BadRow as e:
            skipped.append((number, str(e)))
            continue
        if min_score is not None:
            score = row.get("score")
            if not isinstance(score, (int, float)) or score < min_score:
                below += 1
                continue
        good.append(messages)
    if not good:
        reason = f"all {total} rows were bad" if skipped and not below else (
            f"{below} rows below --min-score {min_score}, {len(skipped)} bad" if total else "the dataset is empty")
        first = f" (first: row {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise DataError(f"no usable conversations: {reason}{first}")
    random.Random(seed).shuffle(good)
    eval_count = min(eval_samples, len(good) - 1)  # always leave at least one to train on
    eval_split, train_split = good[:eval_count], good[eval_count:]
    if max_samples is not None:
        train_split = train_split[:max_samples]
    return Prepared(train_split, eval_split, total, skipped, below)


# ---------------------------------------------------------------------- tokenising
def render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, date_string=TEMPLATE_DATE
    )


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the model should learn to produce.

    Each span runs from the end of the assistant header to the end of that turn, so it covers the
    answer and its closing `<|eot_id|>` (the model must learn to stop), but not the header itself.
    It relies on the template rendering each prefix of a conversation as a prefix of the whole, which
    the Llama-3 template does; anything else is refused rather than masked wrongly.
    """
    text = render(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:index], add_generation_prompt=True))
        upto = render(tokenizer, messages[: index + 1])
        if not text.startswith(upto) or not upto.startswith(text[:start]):
            raise ValueError("chat template does not render conversations prefix-consistently; "
                             "cannot locate assistant turns")
        spans.append((start, len(upto)))
    return text, spans


def tokenize_conversation(messages, tokenizer) -> dict[str, list[int]]:
    """Token ids of the rendered conversation and labels that are -100 except on assistant tokens.

    The template already writes `<|begin_of_text|>`, so the tokenizer must not add another.
    """
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoded["input_ids"]
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for position, (char_start, char_end) in enumerate(encoded["offset_mapping"]):
        while span_index < len(spans) and char_start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and char_start >= spans[span_index][0] and char_end > char_start:
            labels[position] = input_ids[position]
    return {"input_ids": input_ids, "labels": labels}


def tokenize_all(conversations, tokenizer, max_seq_length: int) -> tuple[list[dict[str, list[int]]], int, int]:
    """Tokenise a split; returns (examples, truncated count, dropped count).

    A conversation cut so short that no assistant token is left has nothing to learn from: dropped.
    """
    examples, truncated, dropped = [], 0, 0
    for messages in conversations:
        full = tokenize_conversation(messages, tokenizer)
        if len(full["input_ids"]) > max_seq_length:
            truncated += 1
        example = {key: value[:max_seq_length] for key, value in full.items()}
        if all(label == IGNORE_INDEX for label in example["labels"]):
            dropped += 1
            continue
        examples.append(example)
    return examples, truncated, dropped

