"""Preference pairs for DPO, in TRL's conversational format, from pair files, the Space's vote logs, or the Hub.

    found = read_pairs(["train/data/preference_pairs.jsonl", "votes/"])   # PairSet: pairs + what was left out, why
    heldout, evaluation, train = split_pairs(found.pairs, seed=3407, heldout=8, evaluation=4)

A pair is {"prompt": [{"role": "user", "content": ...}, ...], "chosen": [{"role": "assistant", "content": ...}],
"rejected": [{"role": "assistant", ...}]}: the conversation so far, then the better and the worse answer. Rows may
give any of the three as a plain string (the prompt is then one user turn, an answer one assistant turn), and
ShareGPT's {"from", "value"} turns are accepted as in the SFT data.

A line of the Space's vote log (space/votes.py writes them: model_a, model_b, vote, prompt, answer_a, answer_b)
becomes a pair when it has a winner: vote A → chosen answer_a, rejected answer_b; vote B the other way round. Ties
and "both bad" say nothing about which answer is better: they are skipped and counted. The prompt is the message the
compare answered (the Compare tab answers one message, without history). The same pair twice (a vote repeated, or a
vote file read twice) counts once. Every row that cannot be used is reported as one line naming its file, its line
and the problem; the rows around it still count.

Nothing here imports torch or transformers; the Hub is reached only for a Hub dataset id.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DATA_SUFFIXES, resolve_local_path
from .conversations import ROLE_ALIASES, BadRow, DataError

BUILTIN_PAIRS = Path(__file__).parent / "data" / "preference_pairs.jsonl"
VOTE_WINNERS = {"A": ("answer_a", "answer_b"), "B": ("answer_b", "answer_a")}
VOTE_SKIPPED = ("tie", "both bad")  # space/votes.py's VOTES besides A and B
SHOW_PROBLEMS = 20  # bad rows listed one by one; the rest are counted


@dataclass
class PairSet:
    """The usable pairs, in the order read, and an account of everything else."""

    pairs: list[dict] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    rows: int = 0  # non-blank rows read, votes included
    votes: int = 0  # of which vote lines
    ties: int = 0
    both_bad: int = 0
    duplicates: int = 0
    bad: int = 0
    problems: list[str] = field(default_factory=list)  # "<file> line <n>: <problem>", the first SHOW_PROBLEMS

    def counts(self) -> dict:
        return {"rows": self.rows, "pairs": len(self.pairs), "votes": self.votes, "ties": self.ties,
                "both_bad": self.both_bad, "duplicates": self.duplicates, "bad": self.bad}

    def summary(self) -> list[str]:
        votes = (f", {self.votes} of them votes ({self.ties} ties and {self.both_bad} 'both bad' skipped)"
                 if self.votes else "")
        lines = [f"pairs: {self.rows} rows read from {', '.join(self.sources)}{votes}: {len(self.pairs)} pairs, "
                 f"{self.duplicates} duplicates removed, {self.bad} bad rows skipped"]
        return lines + [f"  {problem}" for problem in self.problems] + (
            [f"  ... and {self.bad - len(self.problems)} more"] if self.bad > len(self.problems) else [])


# ---------------------------------------------------------------------- one row
def _turns(value: Any, role: str, name: str) -> list[dict[str, str]]:
    """A prompt or answer field as role/content messages; a plain string is one turn of `role`."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRow(f"'{name}' is empty")
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise BadRow(f"'{name}' must be a string or a non-empty list of messages, got {type(value).__name__}")
    messages = []
    for index, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise BadRow(f"'{name}' turn {index} is not an object")
        who = turn.get("role", turn.get("from"))
        text = turn.get("content", turn.get("value"))
        if who not in ROLE_ALIASES:
            raise BadRow(f"'{name}' turn {index} has unknown role {who!r} (expected user, assistant or system)")
        if not isinstance(text, str) or not text.strip():
            raise BadRow(f"'{name}' turn {index} has empty text")
        messages.append({"role": ROLE_ALIASES[who], "content": text})
    return messages


def pair_from_row(row: Any) -> dict:
    """A prompt/chosen/rejected row → a pair in TRL's conversational format (BadRow when unusable).

    >>> pair_from_row({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."})["chosen"]
    [{'role': 'assistant', 'content': 'Hello!'}]
    """
    if not isinstance(row, dict):
        raise BadRow(f"not an object (got {type(row).__name__})")
    missing = [name for name in ("prompt", "chosen", "rejected") if row.get(name) is None]
    if missing:
        raise BadRow(f"missing field {', '.join(repr(m) for m in missing)} (a pair needs prompt, chosen, rejected)")
    prompt = _turns(row["prompt"], "user", "prompt")
    if prompt[-1]["role"] != "user":
        raise BadRow("'prompt' must end with a user turn (the answers reply to it)")
    chosen, rejected = _turns(row["chosen"], "assistant", "chosen"), _turns(row["rejected"], "assistant", "rejected")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if any(message["role"] != "assistant" for message in answer):
            raise BadRow(f"'{name}' must hold assistant turns only")
    if chosen == rejected:
        raise BadRow("chosen and rejected are the same answer")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def pair_from_vote(row: dict) -> dict | None:
    """A vote line → a pair (None for a tie or 'both bad': no preference). BadRow when it is not a usable vote.

    >>> pair_from_vote({"vote": "B", "prompt": "Hi", "answer_a": "Go away.", "answer_b": "Hello!"})["chosen"]
    [{'role': 'assistant', 'content': 'Hello!'}]
    >>> pair_from_vote({"vote": "tie", "prompt": "Hi", "answer_a": "Hey", "answer_b": "Hello!"}) is None
    True
    """
    vote = row.get("vote")
    if vote in VOTE_SKIPPED:
        return None
    if vote not in VOTE_WINNERS:
        raise BadRow(f"unknown vote {vote!r} (expected A, B, tie or both bad)")
    if row.get("model_a") is not None and row.get("model_a") == row.get("model_b"):
        raise BadRow(f"a vote of {row['model_a']!r} against itself")
    missing = [name for name in ("prompt", "answer_a", "answer_b") if row.get(name) is None]
    if missing:
        raise BadRow(f"vote without {', '.join(repr(m) for m in missing)}")
    prompt = row["prompt"]
    if isinstance(prompt, dict):  # a multimodal message as Gradio passes it: its text
        prompt = prompt.get("text")
    winner, loser = VOTE_WINNERS[vote]
    return pair_from_row({"prompt": prompt, "chosen": row[winner], "rejected": row[loser]})


# ---------------------------------------------------------------------- reading sources
def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    return [path]


def _rows_of_file(path: Path) -> Iterator[tuple[str, Any]]:
    """("line N", row) for each non-blank line of a JSON Lines file (or record of a .json/.parquet file)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as parquet

        for index, row in enumerate(parquet.read_table(path).to_pylist()):
            yield f"row {index + 1}", row
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # JSON Lines under a .json name: read below
        if data is not None:
            data = data.get("train", data.get("data", [data])) if isinstance(data, dict) else data
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
            for index, row in enumerate(data):
                yield f"row {index + 1}", row
            return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as error:
            yield f"line {number}", BadRow(f"unparseable JSON ({error.msg} at column {error.colno})")


def _rows_of_hub(repo_id: str, split: str) -> Iterator[tuple[str, Any]]:
    """Rows of a Hub dataset: a pair dataset, or the vote dataset a Space pushes (its votes/*.jsonl files)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset(repo_id, split=split)
    except Exception as error:  # offline, unknown repo, unknown split: one clear line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"could not load pairs {repo_id!r} (split {split!r}) from the Hub: {first}") from error
    for index, row in enumerate(rows):
        yield f"row {index + 1}", row


def source_rows(source: str, split: str = "train") -> Iterator[tuple[str, str, Any]]:
    """(where, "line N", row) for every row of a source: a file, a folder of vote logs, or a Hub dataset id."""
    path = resolve_local_path(source)
    if path.exists():
        files = _local_files(path)
        if not files:
            raise DataError(f"--pairs {source}: the folder holds no {', '.join(DATA_SUFFIXES)} files")
        for file in files:
            for position, row in _rows_of_file(file):
                yield str(file), position, row
        return
    for position, row in _rows_of_hub(source, split):
        yield source, position, row


def pair_key(pair: dict) -> str:
    return json.dumps([pair["prompt"], pair["chosen"], pair["rejected"]], sort_keys=True, ensure_ascii=False)


def collect_pairs(rows: Iterator[tuple[str, str, Any]], found: PairSet | None = None) -> PairSet:
    """Turn rows into pairs: votes and pair rows alike; skipped, duplicate and bad rows counted."""
    found = found or PairSet()
    seen = {pair_key(pair) for pair in found.pairs}
    for where, position, row in rows:
        found.rows += 1
        try:
            if isinstance(row, BadRow):
                raise row
            is_vote = isinstance(row, dict) and "vote" in row
            found.votes += is_vote
            pair = pair_from_vote(row) if is_vote else pair_from_row(row)
        except BadRow as error:
            found.bad += 1
            if len(found.problems) < SHOW_PROBLEMS:
                found.problems.append(f"{where} {position}: {error}")
            continue
        if pair is None:
            found.ties += row["vote"] == "tie"
            found.both_bad += row["vote"] == "both bad"
            continue
        key = pair_key(pair)
        if key in seen:
            found.duplicates += 1
            continue
        seen.add(key)
        found.pairs.append(pair)
    return found


def read_pairs(sources: Sequence[str], split: str = "train") -> PairSet:
    """Every pair of every source, in order; DataError when none is usable."""
    found = PairSet(sources=[str(source) for source in sources])
    for source in sources:
        collect_pairs(source_rows(str(source), split), found)
    if not found.pairs:
        first = f" (first: {found.problems[0]})" if found.problems else ""
        raise DataError(f"no usable preference pairs in {', '.join(found.sources)}: {found.rows} rows, {found.bad} "
                        f"bad, {found.ties} ties, {found.both_bad} 'both bad'{first}")
    return found


def split_pairs(pairs: Sequence[dict], *, seed: int, heldout: int, evaluation: int) -> tuple[list, list, list]:
    """(held-out, evaluation, train): the pairs shuffled with the seed, held-out first, then evaluation; at least
    one pair is always left to train on, and each split is fixed by the seed and the pairs alone.

    >>> [len(part) for part in split_pairs([{"n": i} for i in range(10)], seed=1, heldout=3, evaluation=2)]
    [3, 2, 5]
    """
    order = list(pairs)
    random.Random(seed).shuffle(order)
    heldout = min(heldout, max(len(order) - 1, 0))
    evaluation = min(evaluation, max(len(order) - heldout - 1, 0))
    return order[:heldout], order[heldout:heldout + evaluation], order[heldout + evaluation:]
