"""FineTome rows -> role/content messages -> token ids with assistant-only labels.

Rows are read into Arrow (Hugging Face `datasets`: memory-mapped, so a 250 MB FineTome file costs disk, not RAM)
and scanned once in parallel; only the conversations a run uses are ever turned into Python objects. The flow:

    prepared = prepare("train/data/finetome_sample.jsonl", seed=3407, eval_samples=10)  # scan, shuffle, split
    prepared.eval                         # [[{"role", "content"}, ...], ...], materialised on access
    prepared.conversations(prepared.train_rows[:480])                                  # just what 60 steps use
    example = tokenize_conversation(messages, tokenizer)                              # {"input_ids", "labels"}

FineTome-100k rows look like ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}],
"source": ..., "score": ...}. Rows already in {"messages": [{"role", "content"}]} form are accepted too.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.llama3 import (
    TEMPLATE_DATE,  # passed explicitly: the same token ids whatever the day (exact resume)
)
from common.machine import usable_cpus

if TYPE_CHECKING:
    from .summary import DataSplit

IGNORE_INDEX = -100  # what PyTorch's cross-entropy (and so every HF model) skips
PARALLEL_FROM = 20_000  # rows; below this, worker processes cost more than they save

# Roles as FineTome/ShareGPT spell them, and the chat-template role each becomes.
ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "system": "system",
}

# What the scan writes for each row.
GOOD, BAD, BELOW_MIN_SCORE, BLANK = 0, 1, 2, 3


class BadRow(ValueError):
    """A row that cannot be trained on; the message says why."""


class DataError(RuntimeError):
    """The dataset as a whole is unusable (missing file, nothing left after filtering)."""


def worker_count(rows: int) -> int | None:
    """Processes for a `datasets.map` over `rows` rows: None (this process) for small inputs."""
    return min(usable_cpus(), 8) if rows >= PARALLEL_FROM and usable_cpus() > 1 else None


# ---------------------------------------------------------------------- reading
def load_rows(dataset: str | Path, split: str = "train", cache_dir: Path | None = None):
    """The dataset as an Arrow-backed `datasets.Dataset`, one row per line/record, and whether rows are JSON text.

    A .jsonl file is read as text lines, each parsed later by the scan: one unparseable line is then one skipped
    row, not a failed load (datasets' JSON loader refuses the whole file). Row i is line i + 1.
    """
    import datasets

    from .config import resolve_local_path

    datasets.disable_progress_bars()
    path = resolve_local_path(str(dataset))
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet"):
        try:
            return datasets.load_dataset(str(dataset), split=split), False
        except Exception as e:  # offline, unknown repo, unknown split: one clear line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"could not load dataset {dataset!r} (split {split!r}) from the Hub: {first}") from e
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    cache = str(cache_dir) if cache_dir else None
    if suffix == ".parquet":
        return datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=cache), False
    if suffix == ".json":
        rows = _json_list(path)
        if rows is not None:  # a JSON document; otherwise it is really JSON Lines, read below
            return datasets.Dataset.from_dict({"text": [json.dumps(row) for row in rows]}), True
    return datasets.load_dataset("text", data_files=str(path), split="train", cache_dir=cache,
                                 encoding_errors="replace"), True


def _json_list(path: Path) -> list | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError:
        return None
    if isinstance(data, dict):  # {"train": [...]} or a single row
        data = data.get("train", data.get("data", [data]))
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return data


def decode(record: dict, encoded: bool) -> Any:
    """One Arrow record back into the raw row (a BadRow for a line that is not JSON, None for a blank line)."""
    if not encoded:
        return record
    line = record["text"]
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return BadRow(f"unparseable JSON ({e.msg} at column {e.colno})")


def read_rows(dataset: str | Path, split: str = "train") -> Iterator[tuple[int, Any]]:
    """(row number, row) pairs, 1-based; a row that cannot be parsed is a BadRow, blank lines are left out."""
    with tempfile.TemporaryDirectory(prefix="finetome-rows-") as cache:
        rows, encoded = load_rows(dataset, split, Path(cache))
        for index, record in enumerate(rows):
            row = decode(record, encoded)
            if row is not None:
                yield index + 1, row


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
        # Tolerate a row that mixes the two spellings, as some ShareGPT exports do (in Arrow, a spelling a turn
        # does not use is present as None).
        role = turn.get(role_key)
        role = turn.get("role" if role_key == "from" else "from") if role is None else role
        text = turn.get(text_key)
        text = turn.get("content" if text_key == "value" else "value") if text is None else text
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


# ---------------------------------------------------------------------- scanning and splitting
def _classify(batch: dict, encoded: bool, min_score: float | None) -> dict:
    """datasets.map function: the status of each row of a batch (GOOD, BAD, BELOW_MIN_SCORE, BLANK) and why."""
    count = len(next(iter(batch.values())))
    status, reasons = [], []
    for i in range(count):
        row = decode({key: values[i] for key, values in batch.items()}, encoded)
        reason = None
        if row is None:
            code = BLANK
        else:
            try:
                standardize_row(row)
                code = GOOD
                if min_score is not None:
                    score = row.get("score")
                    if not isinstance(score, (int, float)) or score < min_score:
                        code = BELOW_MIN_SCORE
            except BadRow as e:
                code, reason = BAD, str(e)
        status.append(code)
        reasons.append(reason)
    return {"status": status, "reason": reasons}


@dataclass
class Scan:
    """Every row read once: which are usable (`good`, row indices in file order) and why the others are not."""

    rows: Any  # datasets.Dataset, memory-mapped
    encoded: bool
    good: list[int]
    total_rows: int
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (row number, reason)
    below_min_score: int = 0
    workspace: Any = None  # the TemporaryDirectory holding the Arrow files, removed with this object

    def conversations(self, indices: Sequence[int]) -> list[list[dict[str, str]]]:
        """The standardised conversations of these rows, in this order."""
        records = self.rows.select(indices) if len(indices) else []
        return [standardize_row(decode(record, self.encoded)) for record in records]


def scan(dataset: str | Path, split: str = "train", *, min_score: float | None = None,
         work_dir: Path | None = None) -> Scan:
    """Read every row into Arrow and classify it (in parallel on large inputs); DataError when none is usable.

    The Arrow files live in a temporary folder inside `work_dir` (the system's otherwise), removed with the Scan.
    """
    import numpy as np

    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    workspace = tempfile.TemporaryDirectory(prefix=".scan-", dir=work_dir)
    rows, encoded = load_rows(dataset, split, Path(workspace.name))
    classified = rows.map(_classify, batched=True, batch_size=1000, remove_columns=rows.column_names,
                          fn_kwargs={"encoded": encoded, "min_score": min_score}, num_proc=worker_count(len(rows)),
                          cache_file_name=str(Path(workspace.name) / "scan.arrow"), new_fingerprint="scan")
    status = np.asarray(classified.with_format("numpy")["status"])
    good = np.flatnonzero(status == GOOD).tolist()
    bad = np.flatnonzero(status == BAD).tolist()
    reasons = classified.select(bad)["reason"] if bad else []
    skipped = [(index + 1, reason) for index, reason in zip(bad, reasons)]
    total, below = int((status != BLANK).sum()), int((status == BELOW_MIN_SCORE).sum())
    if not good:
        reason = f"all {total} rows were bad" if skipped and not below else (
            f"{below} rows below --min-score {min_score}, {len(skipped)} bad" if total else "the dataset is empty")
        first = f" (first: row {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise DataError(f"no usable conversations: {reason}{first}")
    return Scan(rows, encoded, good, total, skipped, below, workspace)


def split_rows(good: Sequence[int], *, seed: int, eval_samples: int = 0,
               max_samples: int | None = None) -> tuple[list[int], list[int]]:
    """(eval rows, train rows): the usable rows shuffled with the seed, eval taken first.

    The eval split is taken before --max-samples caps the training split, so changing --max-samples never moves a
    conversation from eval into training. random.shuffle's permutation depends only on the length, so shuffling
    row indices orders conversations exactly as shuffling the conversations themselves did.
    """
    order = list(good)
    random.Random(seed).shuffle(order)
    eval_count = min(eval_samples, len(order) - 1)  # always leave at least one to train on
    train = order[eval_count:]
    return order[:eval_count], train[:max_samples] if max_samples is not None else train


@dataclass
class Prepared:
    """A scanned dataset split into eval and train rows; conversations are materialised only when asked for."""

    source: Scan
    eval_rows: list[int]
    train_rows: list[int]

    @property
    def total_rows(self) -> int:
        return self.source.total_rows

    @property
    def skipped(self) -> list[tuple[int, str]]:
        return self.source.skipped

    @property
    def below_min_score(self) -> int:
        return self.source.below_min_score

    @property
    def eval(self) -> list[list[dict[str, str]]]:
        return self.source.conversations(self.eval_rows)

    @property
    def train(self) -> list[list[dict[str, str]]]:
        return self.source.conversations(self.train_rows)

    def conversations(self, rows: Sequence[int]) -> list[list[dict[str, str]]]:
        return self.source.conversations(rows)

    def summary(self, show: int = 5) -> list[str]:
        return data_summary(self.total_rows, len(self.train_rows), len(self.eval_rows), self.skipped,
                            self.below_min_score, show)


def data_summary(total: int, train: int, evaluation: int, skipped: Sequence, below: int, show: int = 5,
                 skipped_count: int | None = None) -> list[str]:
    lines = [f"data: {total} rows read, {train} train / {evaluation} eval conversations"]
    if below:
        lines.append(f"data: {below} rows below --min-score dropped")
    count = len(skipped) if skipped_count is None else skipped_count
    if count:
        lines.append(f"data: skipped {count} bad rows; first {min(show, len(skipped))}:")
        lines += [f"  row {number}: {reason}" for number, reason in list(skipped)[:show]]
    return lines


def prepare(dataset: str | Path, split: str = "train", *, seed: int, eval_samples: int = 0,
            max_samples: int | None = None, min_score: float | None = None, work_dir: Path | None = None) -> Prepared:
    """Scan the dataset, drop bad rows, filter by score, shuffle with the seed, split off eval."""
    source = scan(dataset, split, min_score=min_score, work_dir=work_dir)
    eval_rows, train_rows = split_rows(source.good, seed=seed, eval_samples=eval_samples, max_samples=max_samples)
    return Prepared(source, eval_rows, train_rows)


def prepare_split(split: DataSplit) -> Prepared:
    """The dataset scanned and split exactly as a finished run split it (its run.json's train.summary.DataSplit):
    its training conversations and the held-out ones it never trained on."""
    return prepare(split.dataset, split.dataset_split, seed=split.seed, eval_samples=split.eval_samples,
                   max_samples=split.max_samples, min_score=split.min_score)


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
