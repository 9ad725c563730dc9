"""TrainConfig: every training setting, its default, its flag, and its validation.

The defaults follow Unsloth's Llama-3.2 conversational notebook (LoRA r=16/alpha=16 on all linear
projections, batch 2 x grad-accum 4, lr 2e-4, 5 warmup steps, linear schedule, seed 3407).
Settings are layered: dataclass defaults < preset YAML (train/presets/) < --config FILE.yaml < flags.
The CLI and the tests build the same object; `validate()` reports every problem at once, before any
model or dataset is touched. Nothing here imports torch, transformers or unsloth.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from common.cli import UsageError, UsageParser, add_config_flags, config_field, first_line
from common.files import output_folder_problem
from common.hub import looks_like_repo_id
from common.llama3 import DATASET

from .summary import RunSummary, read_run_summary
from .tiny import TINY_MODEL_NAME, is_builtin

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESET_DIR = Path(__file__).parent / "presets"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BACKENDS = ("auto", "unsloth", "hf")
REPORT_TO = ("none", "tensorboard", "wandb")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
OPTIMIZERS = ("auto", "adamw_8bit", "adamw_torch", "adamw_torch_fused", "sgd")
DTYPES = ("auto", "fp32", "fp16", "bf16")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
STAGES = ("sft", "dpo")
# TRL 1.15's DPO losses that need no setting of their own (exo_pair needs label smoothing; aot*/sppo_hard/bco_pair
# and the rest of TRL's list are research variants: passed through untested, so not offered).
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "apo_zero", "apo_down", "discopop")


@dataclass
class TrainConfig:
    # Model
    model_name: str = config_field(
        "unsloth/Llama-3.2-1B-Instruct",
        f"Hub id or local folder of the base model; '{TINY_MODEL_NAME}' is the offline test model",
    )
    backend: str = config_field("auto", "auto = unsloth on a CUDA GPU when installed, else hf", choices=BACKENDS)
    load_in_4bit: bool = config_field(True, "load the base in 4-bit (bitsandbytes) on CUDA; ignored on CPU")
    dtype: str = config_field("auto", "compute dtype: auto = fp32 on CPU, bf16 on GPUs that have it, else fp16", choices=DTYPES)
    # Unsloth decides the variant from the length the model is loaded for (apply_unsloth_gradient_checkpointing in
    # unsloth/models/_utils.py): below 512 tokens offloading costs more than it saves, so it uses the standard one.
    gradient_checkpointing: bool = config_field(True, "trade compute for memory; on unsloth: Unsloth's variant, which "
                                                "offloads activations to CPU RAM, when --max-seq-length (dpo: "
                                                "--max-prompt-length + --max-answer-length) is 512 or more, else the "
                                                "standard one")

    # Data
    dataset: str = config_field(DATASET, "Hub dataset id, or a local .jsonl/.json/.parquet in FineTome's schema")
    dataset_split: str = config_field("train", "split to read from a Hub dataset")
    max_samples: int | None = config_field(None, "use at most this many training conversations (after filtering)")
    min_score: float | None = config_field(None, "drop conversations whose FineTome 'score' is below this")
    eval_samples: int = config_field(200, "conversations held out for evaluation (0 = no eval split)")
    max_seq_length: int = config_field(2048, "tokens per training sequence; longer conversations are truncated")

    # LoRA
    lora_r: int = config_field(16, "LoRA rank: higher = more capacity, more VRAM")
    lora_alpha: int = config_field(16, "LoRA scale numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA)")
    lora_dropout: float = config_field(0.0, "dropout on the LoRA input; 0 is what Unsloth optimises for")
    use_rslora: bool = config_field(False, "rank-stabilised LoRA scaling")
    target_modules: list[str] = config_field(list(LORA_TARGETS), "projections that get LoRA adapters")

    # Optimisation
    max_steps: int = config_field(60, "optimizer steps to train for; -1 = --epochs passes over the data")
    epochs: float = config_field(1.0, "passes over the data when --max-steps is -1")
    batch_size: int = config_field(2, "sequences per device per forward pass")
    grad_accum: int = config_field(4, "forward passes per optimizer step (effective batch = batch x accum)")
    learning_rate: float = config_field(2e-4, "peak learning rate")
    warmup_steps: int = config_field(5, "linear warmup steps")
    lr_scheduler: str = config_field("linear", "learning-rate schedule", choices=SCHEDULERS)
    weight_decay: float = config_field(0.01, "AdamW weight decay")
    optim: str = config_field("auto", "optimizer: auto = adamw_8bit on CUDA, adamw_torch on CPU", choices=OPTIMIZERS)
    seed: int = config_field(3407, "seed for data order, LoRA init and the tiny model")

    # Checkpoints, logging, outputs
    output_dir: str = config_field("outputs/llama-3.2-1b-finetome", "where checkpoints and the adapter go (a Drive folder on Colab)")
    save_steps: int = config_field(50, "save a checkpoint every N optimizer steps")
    save_total_limit: int = config_field(3, "keep at most N complete checkpoints (older ones are deleted)")
    eval_steps: int | None = config_field(None, "evaluate every N steps (default: --save-steps)")
    logging_steps: int = config_field(1, "log the loss every N steps")
    resume: str = config_field("auto", "auto = newest complete checkpoint, never, or a checkpoint folder")
    overwrite: bool = config_field(False, "with --resume never: delete existing checkpoints first")
    report_to: str = config_field("none", "experiment tracker", choices=REPORT_TO)

    # Preference tuning (DPO) on top of a finished SFT run: train/dpo.py
    stage: str = config_field("sft", "sft = LoRA fine-tune on conversations; dpo = preference tuning (DPO) of a finished "
                              "SFT run's adapter (--sft-adapter) on chosen/rejected pairs (--pairs)", choices=STAGES)
    sft_adapter: str | None = config_field(None, "dpo: the adapter/ folder of the finished SFT run to start from; a "
                                           "frozen copy of it is the reference")
    pairs: list[str] = config_field([], "dpo: where the pairs come from: .jsonl/.json/.parquet files of prompt/chosen/"
                                    "rejected, the Space's vote logs (a votes*.jsonl file or a folder of them), or a Hub "
                                    "dataset id (pairs, or the vote dataset a Space pushes)")
    beta: float = config_field(0.1, "dpo: how far the policy may move from the SFT reference (higher = stays closer)")
    loss_type: str = config_field("sigmoid", "dpo: TRL's preference loss", choices=DPO_LOSSES)
    max_prompt_length: int = config_field(1024, "dpo: pairs whose prompt (chat-templated) is longer than this many "
                                          "tokens are left out and counted")
    max_answer_length: int = config_field(1024, "dpo: answers are cut so that prompt + answer fits "
                                          "--max-prompt-length + --max-answer-length tokens")
    heldout_pairs: int = config_field(20, "dpo: pairs kept out of training and evaluation, scored before and after "
                                      "(preference accuracy, reward margin)")

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def problems(self) -> list[str]:
        out: list[str] = []

        def bad(flag: str, value: Any, allowed: str):
            out.append(f"--{flag.replace('_', '-')} {value!r}: {allowed}")

        def at_least(name: str, low, allow_none: bool = False):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not is_number or value < low:
                bad(name, value, f"must be a number >= {low}")

        for f in fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                bad(f.name, value, f"choose one of: {', '.join(choices)}")
            # A YAML config can hold 2.5 where a count belongs; transformers would fail on it mid-setup.
            if f.type in ("int", "int | None") and isinstance(value, float):
                bad(f.name, value, "must be a whole number")
        for name in ("max_seq_length", "lora_r", "lora_alpha", "batch_size", "grad_accum", "save_steps",
                     "logging_steps"):
            at_least(name, 1)
        for name in ("eval_samples", "warmup_steps", "save_total_limit", "seed", "weight_decay"):
            at_least(name, 0)
        at_least("max_samples", 1, allow_none=True)
        at_least("eval_steps", 1, allow_none=True)
        if isinstance(self.max_seq_length, int) and self.max_seq_length < 64:
            bad("max_seq_length", self.max_seq_length, "must be >= 64 (a chat turn needs room)")
        if not (isinstance(self.max_steps, int) and (self.max_steps >= 1 or self.max_steps == -1)):
            bad("max_steps", self.max_steps, "must be >= 1, or -1 to train for --epochs")
        if not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            bad("epochs", self.epochs, "must be > 0")
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate <= 1):
            bad("learning_rate", self.learning_rate, "must be in (0, 1], e.g. 2e-4")
        if not (isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1):
            bad("lora_dropout", self.lora_dropout, "must be in [0, 1)")
        if self.min_score is not None and not isinstance(self.min_score, (int, float)):
            bad("min_score", self.min_score, "must be a number (FineTome scores lie between about 3 and 5.5)")
        targets = self.target_modules if isinstance(self.target_modules, list) else [self.target_modules]
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets:
            bad("target_modules", ",".join(map(str, targets)), f"choose from: {', '.join(LORA_TARGETS)}")
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            bad("model_name", self.model_name, "give a Hub id like unsloth/Llama-3.2-1B-Instruct or a local folder")
        elif not (is_builtin(self.model_name) or looks_like_repo_id(self.model_name)
                  or Path(self.model_name).expanduser().is_dir()):
            bad("model_name", self.model_name, f"not a Hub id (owner/name), an existing folder, or {TINY_MODEL_NAME}")
        elif is_builtin(self.model_name) and self.model_name != TINY_MODEL_NAME:
            bad("model_name", self.model_name, f"the only built-in model is {TINY_MODEL_NAME}")
        out += self._dataset_problems()
        if self.resume not in ("auto", "never") and not Path(self.resume).expanduser().is_dir():
            bad("resume", self.resume, "use auto, never, or an existing checkpoint folder")
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            bad("output_dir", self.output_dir, "give a folder path")
        elif problem := output_folder_problem(Path(self.output_dir)):
            bad("output_dir", self.output_dir, f"{problem}; choose a folder this user can write")
        out += self._dpo_problems()
        if self.report_to in ("tensorboard", "wandb"):
            module = "tensorboard" if self.report_to == "tensorboard" else "wandb"
            if importlib.util.find_spec(module) is None:
                bad("report_to", self.report_to, f"needs the '{module}' package: pip install {module}")
        return out

    def _dataset_problems(self) -> list[str]:
        value = self.dataset
        if not isinstance(value, str) or not value.strip():
            return [f"--dataset {value!r}: give a Hub id like mlabonne/FineTome-100k or a local .jsonl/.json/.parquet"]
        path = resolve_local_path(value)
        looks_local = path.suffix.lower() in DATA_SUFFIXES or path.exists() or value.startswith((".", "/", "~"))
        if not looks_local:
            if looks_like_repo_id(value):
                return []
            return [f"--dataset {value!r}: not a Hub id (owner/name) or a local .jsonl/.json/.parquet file"]
        if path.suffix.lower() not in DATA_SUFFIXES:
            return [f"--dataset {value!r}: local files must end in {', '.join(DATA_SUFFIXES)}"]
        if not path.is_file():
            return [f"--dataset {value!r}: file not found (checked {path})"]
        return []

    def _dpo_problems(self) -> list[str]:
        """The DPO settings: an SFT adapter that exists and matches --model-name, pair sources that exist."""
        out: list[str] = []
        if self.stage != "dpo":
            given = [name for name in ("sft_adapter", "pairs") if getattr(self, name)]
            return [f"--{name.replace('_', '-')}: only used with --stage dpo (or a *-dpo preset)" for name in given]
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            out.append(f"--beta {self.beta!r}: must be > 0, e.g. 0.1")
        for name, low in (("max_prompt_length", 16), ("max_answer_length", 16), ("heldout_pairs", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                out.append(f"--{name.replace('_', '-')} {value!r}: must be a whole number >= {low}")
        out += self._sft_adapter_problems()
        sources = self.pairs if isinstance(self.pairs, list) else [self.pairs]
        if not sources:
            out.append("--pairs []: give at least one source of pairs, e.g. train/data/preference_pairs.jsonl or "
                       "votes/ (the Space's vote log folder)")
        for source in sources:
            path = resolve_local_path(str(source))
            if path.is_dir() or path.is_file():
                if path.is_file() and path.suffix.lower() not in DATA_SUFFIXES:
                    out.append(f"--pairs {source!r}: local files must end in {', '.join(DATA_SUFFIXES)}")
            elif path.suffix.lower() in DATA_SUFFIXES or str(source).startswith((".", "/", "~")) \
                    or str(source).endswith("/"):
                out.append(f"--pairs {source!r}: not found (checked {path})")
            elif not looks_like_repo_id(str(source)):
                out.append(f"--pairs {source!r}: not a file, a folder of vote logs, or a Hub dataset id (owner/name)")
        return out

    def _sft_adapter_problems(self) -> list[str]:
        if not self.sft_adapter:
            return ["--sft-adapter None: give the adapter/ folder of a finished SFT run, e.g. outputs/tiny/adapter"]
        adapter = sft_adapter_dir(self.sft_adapter)
        missing = [name for name in ("adapter_config.json", "adapter_model.safetensors") if not (adapter / name).is_file()]
        if missing:
            return [f"--sft-adapter {self.sft_adapter!r}: no finished adapter there (missing {', '.join(missing)}); "
                    "give the adapter/ folder that train/run.py wrote at the end of the SFT run"]
        out = []
        trained_on = sft_run_summary(adapter).model_name
        if trained_on and trained_on != self.model_name:
            out.append(f"--model-name {self.model_name!r}: the SFT adapter was trained on {trained_on!r}; "
                       f"pass --model-name {trained_on}")
        if isinstance(self.output_dir, str) and Path(self.output_dir).expanduser().resolve() == adapter.parent.resolve():
            out.append(f"--output-dir {self.output_dir!r}: is the SFT run's own folder; give the DPO run a folder of "
                       "its own (its adapter would replace the SFT one)")
        return out

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise UsageError(problems)

    # ------------------------------------------------------------------ derived values
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_local_path(value: str) -> Path:
    """A relative path is looked up from the working directory, then from the repository root.

    Presets name the shipped sample as `train/data/finetome_sample.jsonl`, which must work whether the
    user runs from the repo root (the documented way) or from elsewhere.
    """
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path
    from_repo = REPO_ROOT / path
    return from_repo if from_repo.exists() else path


def sft_adapter_dir(value: str) -> Path:
    """--sft-adapter as a folder: the adapter/ folder itself, or the SFT run's folder that holds it."""
    path = resolve_local_path(str(value))
    return path / "adapter" if (path / "adapter" / "adapter_config.json").is_file() else path


def sft_run_summary(adapter: Path) -> RunSummary:
    """The run.json the SFT run wrote beside its adapter (empty when absent or unreadable)."""
    return read_run_summary(Path(adapter).parent) or RunSummary()


# ---------------------------------------------------------------------- presets and YAML
def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise UsageError([f"{what} {str(path)!r}: file not found"]) from None
    except IsADirectoryError:
        raise UsageError([f"{what} {str(path)!r}: is a folder; give a YAML file of field: value"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError([f"{what} {str(path)!r}: cannot be read ({first_line(e)})"]) from None
    except yaml.YAMLError as e:
        raise UsageError([f"{what} {str(path)!r}: not valid YAML ({str(e).splitlines()[0]})"]) from None
    if not isinstance(data, dict):
        raise UsageError([f"{what} {str(path)!r}: must be a mapping of field: value"])
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError([f"{what} {str(path)!r}: unknown field(s) {', '.join(unknown)}; "
                           f"known fields: {', '.join(sorted(known))}"])
    return data


def load_preset(name: str) -> dict[str, Any]:
    if name not in available_presets():
        raise UsageError([f"--preset {name!r}: choose one of: {', '.join(available_presets())}"])
    return read_yaml(PRESET_DIR / f"{name}.yaml", "preset")


# ---------------------------------------------------------------------- command line
def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_optional(kind):
    def parse(text: str):
        if text.lower() in ("none", "all", "null"):
            return None
        return kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


# A field's annotation -> how its flag parses a value: a bool flag alone means true; none/all/null unsets a limit.
FLAG_KINDS: dict[str, dict[str, Any]] = {
    "bool": dict(type=_parse_bool, nargs="?", const=True, metavar="BOOL"),
    "int": dict(type=int),
    "float": dict(type=float),
    "int | None": dict(type=_parse_optional(int)),
    "float | None": dict(type=_parse_optional(float)),
    "list[str]": dict(type=lambda s: [x.strip() for x in s.split(",") if x.strip()], metavar="A,B,..."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog="python train/run.py",
        description="LoRA fine-tune Llama-3.2 1B/3B Instruct on FineTome-100k (Unsloth on CUDA, "
        "transformers+PEFT+TRL anywhere). Interrupted runs resume from the newest complete checkpoint. "
        "Defaults shown are the built-in values: the preset overrides them, then --config, then flags.",
    )
    parser.add_argument("--preset", default="1b",
                        help=f"starting settings: {', '.join(available_presets())} (default: 1b)")
    parser.add_argument("--config", type=Path, help="YAML file of field: value, applied over the preset")
    add_config_flags(parser, TrainConfig, kinds=FLAG_KINDS, layered=True)
    return parser


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse flags, layer preset < --config < flags, and validate everything at once."""
    args = vars(build_parser().parse_args(argv))
    preset = args.pop("preset")
    config_file = args.pop("config")
    values = load_preset(preset)
    if config_file is not None:
        values.update(read_yaml(config_file, "--config"))
    values.update(args)
    return TrainConfig(**values)
