"""run.json: the summary a training run writes when it finishes (train/trainer.py for SFT, train/dpo.py for DPO),
and the one way to read it back.

    summary = read_run_summary("outputs/tiny")      # None when the folder has no readable run.json
    summary.steps, summary.model_name, prepare_split(summary.data_split).eval     # train.conversations.prepare_split

The file is one JSON object, exactly the mapping the run wrote (the resolved config, the steps, the losses, the data
facts, ...); RunSummary keeps it whole, so the model card can show any of it, and names what the readers use. A
run.json that is absent, not JSON or not an object reads as None (read_run_summary), or as a RunSummaryError that
says which (load_run_summary), here and nowhere else. A value a file lacks (a file written by hand, by an older
version) reads as None or an empty mapping.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.files import write_json_atomic

from .tiny import is_builtin

RUN_FILE = "run.json"


class RunSummaryError(ValueError):
    """A folder's run.json is missing (`absent`) or cannot be read; the message says which."""

    def __init__(self, message: str, absent: bool = False):
        super().__init__(message)
        self.absent = absent


@dataclass(frozen=True)
class DataSplit:
    """Which conversations a run trained on and which it held out: train.conversations.prepare()'s arguments, from its config
    (train.conversations.prepare_split rebuilds them).

    >>> split = DataSplit.from_config({"dataset": "train/data/taught.jsonl", "seed": 1, "eval_samples": 0})
    >>> split.dataset_split, split.seed, split.eval_samples, split.max_samples
    ('train', 1, 0, None)
    >>> DataSplit.from_config({"dataset": "mlabonne/FineTome-100k"})
    Traceback (most recent call last):
    ValueError: does not record the training config's seed, eval_samples
    """

    dataset: str
    seed: int
    eval_samples: int
    dataset_split: str = "train"
    max_samples: int | None = None
    min_score: float | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DataSplit:
        """From a run's config (TrainConfig.to_dict()); ValueError naming what it lacks (a seed or an eval size
        guessed here could move held-out conversations into training)."""
        config = config if isinstance(config, Mapping) else {}
        missing = [name for name in ("dataset", "seed", "eval_samples") if config.get(name) in (None, "")]
        if missing:
            raise ValueError(f"does not record the training config's {', '.join(missing)}")
        return cls(dataset=str(config["dataset"]), seed=config["seed"], eval_samples=config["eval_samples"],
                   dataset_split=config.get("dataset_split") or "train", max_samples=config.get("max_samples"),
                   min_score=config.get("min_score"))


@dataclass(frozen=True)
class RunSummary(Mapping[str, Any]):
    """A run's run.json: the mapping as written (read like a dict), and the values readers use, by name.

    >>> summary = RunSummary({"config": {"model_name": "builtin:tiny-llama-3.2", "dataset": "d.jsonl", "seed": 3,
    ...                                  "eval_samples": 2}, "steps": 6})
    >>> summary.steps, summary.max_steps, summary.trained_on_builtin, summary.data_split.seed
    (6, None, True, 3)
    >>> bool(RunSummary({})), RunSummary({}).config, RunSummary({}).data_split
    (False, {}, None)
    """

    raw: dict[str, Any] = field(default_factory=dict)

    # The mapping, as written: the model card renders whatever a run recorded.
    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    @property
    def config(self) -> dict[str, Any]:
        """The run's resolved TrainConfig, as TrainConfig.to_dict() wrote it ({} when not recorded)."""
        config = self.raw.get("config")
        return config if isinstance(config, dict) else {}

    @property
    def model_name(self) -> str | None:
        """The --model-name the run trained on (a Hub id, a folder or the built-in tiny model)."""
        return self.config.get("model_name")

    @property
    def trained_on_builtin(self) -> bool:
        """Whether the run trained the built-in tiny model (train/tiny.py)."""
        return is_builtin(self.model_name)

    @property
    def seed(self) -> int | None:
        return self.config.get("seed")

    @property
    def dataset(self) -> str | None:
        return self.config.get("dataset")

    @property
    def data_split(self) -> DataSplit | None:
        """How the run split its data, to rebuild its training or held-out conversations (None when not recorded)."""
        try:
            return DataSplit.from_config(self.config)
        except ValueError:
            return None

    @property
    def steps(self) -> int | None:
        """The optimizer steps done when the run finished."""
        return self.raw.get("steps")

    @property
    def max_steps(self) -> int | None:
        return self.raw.get("max_steps")

    @property
    def adapter(self) -> str | None:
        return self.raw.get("adapter")

    @property
    def resumed_from(self) -> str | None:
        return self.raw.get("resumed_from")

    @property
    def train_loss(self) -> float | None:
        return self.raw.get("train_loss")

    @property
    def tokens_per_second(self) -> float | None:
        return self.raw.get("tokens_per_second")

    @property
    def peak_rss_mb(self) -> float | None:
        return self.raw.get("peak_rss_mb")


def run_file(folder: str | Path) -> Path:
    """Where a run's summary lives: <output-dir>/run.json (beside its adapter/)."""
    return Path(folder).expanduser() / RUN_FILE


def write_run_summary(folder: str | Path, summary: Mapping[str, Any]) -> Path:
    """Write <folder>/run.json atomically (indented JSON); its path."""
    path = run_file(folder)
    write_json_atomic(path, dict(summary))
    return path


def load_run_summary(folder: str | Path) -> RunSummary:
    """<folder>/run.json, or RunSummaryError saying why not: absent, or unreadable (not UTF-8 JSON, not an object)."""
    path = run_file(folder)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunSummaryError(f"no {path}", absent=True) from None
    except (OSError, UnicodeDecodeError) as error:
        raise RunSummaryError(f"cannot read {path} ({error})") from error
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise RunSummaryError(f"cannot read {path} (not JSON: {error})") from error
    if not isinstance(parsed, dict):
        raise RunSummaryError(f"cannot read {path} (a JSON {type(parsed).__name__}, not an object)")
    return RunSummary(parsed)


def read_run_summary(folder: str | Path) -> RunSummary | None:
    """<folder>/run.json, or None when it is absent or unreadable (an adapter exported from elsewhere, a run that
    never finished)."""
    try:
        return load_run_summary(folder)
    except RunSummaryError:
        return None
