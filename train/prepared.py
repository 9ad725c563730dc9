"""The tokenized data a run trains on, prepared once and kept beside its checkpoints.

    <output-dir>/data/prepared.json   the fingerprint (data source + every setting that changes the data, and the
                                      tokenizer) and the data summary that run.json reports
    <output-dir>/data/train/, eval/   the tokenized conversations (datasets.save_to_disk: Arrow, memory-mapped)

Only what the run will use is tokenized: with --max-steps, steps x batch x grad-accum (x processes) training
conversations, the first ones of the seeded shuffle, plus the eval split. A rerun or a resume after a dead
runtime whose fingerprint matches loads these in a second instead of reading the dataset again; a change to
the file or to --seed, --eval-samples, --max-samples, --min-score, --max-seq-length, --max-steps, --batch-size,
--grad-accum or the tokenizer prepares afresh (and says why). The folder is written under a temporary name and
renamed when complete, so a run killed while preparing leaves nothing that a later run could trust.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.files import (
    remove_stale_temporaries,
    sha256_file,
    swap_in_folder,
    temporary_path,
    write_json_atomic,
)
from common.llama3 import TEMPLATE_DATE

from .config import TrainConfig, resolve_local_path
from .conversations import (
    IGNORE_INDEX,
    DataError,
    Prepared,
    data_summary,
    decode,
    prepare,
    standardize_row,
    tokenize_conversation,
    worker_count,
)

VERSION = 1  # of the prepared format and of the rules that make it; a change prepares every run afresh
SHOW_SKIPPED = 20  # bad rows whose reasons prepared.json keeps


def train_rows_needed(config: TrainConfig) -> int | None:
    """Training conversations the run consumes: one pass of --max-steps optimizer steps; None for --epochs."""
    if config.max_steps < 1:
        return None
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # under `accelerate launch`, each process reads its own
    return config.max_steps * config.batch_size * config.grad_accum * processes


def source_identity(dataset: str, split: str) -> dict:
    """What identifies the data source: a local file's path, size and modification time; a Hub id and split."""
    path = resolve_local_path(str(dataset))
    if path.suffix.lower() not in (".jsonl", ".json", ".parquet"):
        return {"hub": str(dataset), "split": split}
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    stat = path.stat()
    return {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def same_source(recorded: dict, current: dict) -> bool:
    """Whether the recorded source is the current one: same path, size and time, or else the same SHA-256 (a
    file copied or touched is still the same data; hashing 250 MB takes about a second, and only then)."""
    if "file" not in current:
        return {k: v for k, v in recorded.items() if k != "sha256"} == current
    if all(recorded.get(key) == current[key] for key in ("file", "size", "mtime_ns")):
        return True
    return recorded.get("size") == current["size"] and recorded.get("sha256") == sha256_file(Path(current["file"]))


def settings_of(config: TrainConfig) -> dict:
    return {"version": VERSION, "split": config.dataset_split, "seed": config.seed,
            "eval_samples": config.eval_samples, "max_samples": config.max_samples, "min_score": config.min_score,
            "max_seq_length": config.max_seq_length, "train_rows": train_rows_needed(config)}


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of everything that decides the token ids: the whole tokenizer definition and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha256(definition.encode())
    digest.update(json.dumps([tokenizer.chat_template, TEMPLATE_DATE, IGNORE_INDEX]).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------- tokenizing the selection
def _tokenize_batch(batch: dict, encoded: bool, tokenizer, max_seq_length: int) -> dict:
    """datasets.map function: the rows of a batch -> input_ids/labels cut to max_seq_length, and what happened."""
    out = {"input_ids": [], "labels": [], "truncated": [], "keep": []}
    for i in range(len(next(iter(batch.values())))):
        messages = standardize_row(decode({key: values[i] for key, values in batch.items()}, encoded))
        full = tokenize_conversation(messages, tokenizer)
        labels = full["labels"][:max_seq_length]
        out["input_ids"].append(full["input_ids"][:max_seq_length])
        out["labels"].append(labels)
        out["truncated"].append(len(full["input_ids"]) > max_seq_length)
        # A conversation cut so short that no assistant token is left has nothing to learn from: dropped.
        out["keep"].append(any(label != IGNORE_INDEX for label in labels))
    return out


def tokenize_rows(prepared: Prepared, rows: Sequence[int], tokenizer, max_seq_length: int, key: str):
    """The rows tokenized (in parallel on large selections): (dataset, truncated count, dropped count)."""
    from datasets import Features, Value
    from datasets import Sequence as ListOf

    features = Features({"input_ids": ListOf(Value("int64")), "labels": ListOf(Value("int64")),
                         "truncated": Value("bool"), "keep": Value("bool")})
    if not len(rows):
        from datasets import Dataset

        return Dataset.from_dict({"input_ids": [], "labels": []}, features=Features(
            {"input_ids": ListOf(Value("int64")), "labels": ListOf(Value("int64"))})), 0, 0
    source = prepared.source
    selected = source.rows.select(rows)
    mapped = selected.map(_tokenize_batch, batched=True, batch_size=100, remove_columns=selected.column_names,
                          features=features, num_proc=worker_count(len(rows)), new_fingerprint=key,
                          fn_kwargs={"encoded": source.encoded, "tokenizer": tokenizer,
                                     "max_seq_length": max_seq_length},
                          cache_file_name=str(Path(source.workspace.name) / f"{key}.arrow"))
    truncated = int(sum(mapped["truncated"]))
    kept = mapped.filter(lambda keep: keep, input_columns="keep",
                         cache_file_name=str(Path(source.workspace.name) / f"{key}-kept.arrow"))
    return kept.remove_columns(["truncated", "keep"]), truncated, len(mapped) - len(kept)


def tokenize_train(prepared: Prepared, tokenizer, max_seq_length: int, want: int | None):
    """The training split tokenized: all of it, or the first `want` conversations that keep an assistant token
    after truncation (taken in the shuffled order, topped up in further chunks when some are dropped)."""
    from datasets import concatenate_datasets

    if want is None:
        return tokenize_rows(prepared, prepared.train_rows, tokenizer, max_seq_length, "train")
    parts, truncated, dropped, start = [], 0, 0, 0
    while sum(len(part) for part in parts) < want and start < len(prepared.train_rows):
        count = want - sum(len(part) for part in parts)
        part, cut, lost = tokenize_rows(prepared, prepared.train_rows[start:start + count], tokenizer,
                                        max_seq_length, f"train-{start}")
        parts.append(part)
        truncated, dropped, start = truncated + cut, dropped + lost, start + count
    return concatenate_datasets(parts), truncated, dropped


# ---------------------------------------------------------------------- the folder beside the checkpoints
DATA_KEYS = ("rows", "train", "eval", "skipped", "below_min_score", "truncated", "dropped")


def _well_formed(manifest) -> bool:
    return (isinstance(manifest, dict) and isinstance(manifest.get("settings"), dict)
            and isinstance(manifest.get("source"), dict) and isinstance(manifest.get("tokenizer"), str)
            and isinstance(manifest.get("data"), dict) and all(isinstance(manifest["data"].get(key), int)
                                                                for key in DATA_KEYS))



@dataclass
class RunData:
    train: Any  # datasets.Dataset
    eval: Any  # datasets.Dataset or None
    info: dict  # rows, train, eval, skipped, below_min_score, truncated, dropped (run.json's "data")
    reused: bool


class PreparedStore:
    """<output-dir>/data: `find` before the model loads (a miss scans the dataset then, so data errors come
    first), `finish` after (the tokenizer is the model's)."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.folder = self.output_dir / "data"
        self.staging = temporary_path(self.folder)

    def find(self, config: TrainConfig) -> tuple[dict | None, str]:
        """The manifest of prepared data that fits this config and source, else None and why not."""
        remove_stale_temporaries(self.output_dir, ".data.")
        manifest_file = self.folder / "prepared.json"
        if not manifest_file.is_file():
            return None, "none prepared yet"
        try:
            manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None, f"{manifest_file} is unreadable"
        if not _well_formed(manifest):
            return None, f"{manifest_file} is not one this version wrote"
        missing = [name for name in ("train", "eval") if not (self.folder / name / "state.json").is_file()]
        if missing:
            return None, f"{self.folder / missing[0]} is missing"
        changed = [key for key, value in settings_of(config).items() if manifest["settings"].get(key) != value]
        if changed:
            return None, "changed since it was prepared: " + ", ".join(changed)
        if not same_source(manifest["source"], source_identity(config.dataset, config.dataset_split)):
            return None, f"{config.dataset} changed since it was prepared"
        return manifest, ""

    def scan(self, config: TrainConfig) -> Prepared:
        """Read and split the dataset (its Arrow files in the staging folder, so a killed run leaves no litter)."""
        return prepare(config.dataset, config.dataset_split, seed=config.seed, eval_samples=config.eval_samples,
                       max_samples=config.max_samples, min_score=config.min_score, work_dir=self.staging)

    def finish(self, config: TrainConfig, manifest: dict | None, prepared: Prepared | None, tokenizer,
               log=print) -> RunData:
        from datasets import load_from_disk

        fingerprint = tokenizer_fingerprint(tokenizer)
        if manifest is not None and manifest.get("tokenizer") == fingerprint:
            info = manifest["data"]
            evaluation = load_from_disk(str(self.folder / "eval")) if info["eval"] else None
            return RunData(load_from_disk(str(self.folder / "train")), evaluation, info, True)
        if prepared is None:
            log("data: the tokenizer changed since the data was prepared; preparing again")
            prepared = self.scan(config)
        train, truncated, dropped = tokenize_train(prepared, tokenizer, config.max_seq_length,
                                                   train_rows_needed(config))
        evaluation, _, _ = tokenize_rows(prepared, prepared.eval_rows, tokenizer, config.max_seq_length, "eval")
        info = {"rows": prepared.total_rows, "train": len(train), "eval": len(evaluation),
                "skipped": len(prepared.skipped), "below_min_score": prepared.below_min_score,
                "truncated": truncated, "dropped": dropped}
        source = source_identity(config.dataset, config.dataset_split)
        if "file" in source:
            source["sha256"] = sha256_file(Path(source["file"]))
        train.save_to_disk(str(self.staging / "train"))
        evaluation.save_to_disk(str(self.staging / "eval"))
        prepared.source.workspace.cleanup()  # the scan's Arrow files: everything needed is saved above
        write_json_atomic(self.staging / "prepared.json", {
            "settings": settings_of(config), "source": source, "tokenizer": fingerprint, "data": info,
            "skipped_first": prepared.skipped[:SHOW_SKIPPED]})
        swap_in_folder(self.staging, self.folder)
        evaluation = load_from_disk(str(self.folder / "eval")) if len(evaluation) else None
        return RunData(load_from_disk(str(self.folder / "train")), evaluation, info, False)


def summary_lines(manifest: dict) -> list[str]:
    """The data lines a run prints, from a manifest (a reused preparation reports what it was made from)."""
    info = manifest["data"]
    return data_summary(info["rows"], info["train"], info["eval"], manifest.get("skipped_first", []),
                        info["below_min_score"], skipped_count=info["skipped"])
