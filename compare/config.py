"""CompareConfig: every setting of a comparison, its default, its flag, and its validation.

    python scripts/compare.py --model q4=exports/tiny/X-Q4_K_M.gguf --model q8=exports/tiny/X-Q8_0.gguf --max-tokens 64

One dataclass: each field is a flag (common/cli.py's config_field: the default and the --help in one place) and
`build_parser` is generated from the fields; the sampling and context defaults are the Space's own. The CLI and the
tests build the same object; `validate()` reports every problem at once, one line each naming the flag, the value
and the fix (exit code 2). Checking the models, the prompts and the held-out set means reading them: validate()
keeps what it read (`models`, `prompt_list`, `heldout_set`), so a run never reads them twice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import UsageError, UsageParser, add_config_flags, config_field
from space.catalog import ModelSpec
from space.engine import DEFAULT_N_CTX
from space.replies import Sampling
from train.conversations import DataError

from .heldout import HeldOut, load_heldout
from .models import DEFAULT_GLOB, check_model_arguments
from .prompts import DEFAULT_PROMPTS, PROMPT_EXAMPLE, REPO, Prompt, load_prompts
from .report import FILES

DESCRIPTION = ("Compare GGUF chat models as the Space serves them: held-out perplexity, speed, stopping, answers side "
               "by side.")
DEFAULT_OUT = "outputs/compare"
SAMPLING = Sampling()  # the Space's slider defaults
SPACE_N_CTX = DEFAULT_N_CTX  # the Space's context (space/app.py --n-ctx)
# The Space's slider ranges: a figure measured outside them is not one a Space user can get.
MAX_TOKENS_RANGE, TEMPERATURE_RANGE, TOP_P_RANGE = (16, 1024), (0, 2), (0.05, 1)
MAX_SEED = 2**31 - 1


def _range(bounds: tuple) -> str:
    return f"{bounds[0]}-{bounds[1]}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class CompareConfig:
    # What is compared, on what
    model: list[str] = config_field(
        [], "a model to compare (repeatable): LABEL=path/to/X.gguf or LABEL=USER/NAME[:GLOB] (a Hub repo; GLOB "
        f"defaults to {DEFAULT_GLOB})", action="append", metavar="LABEL=PATH_OR_REPO")
    prompts: str | None = config_field(
        None, f"JSON Lines of prompts (default: {DEFAULT_PROMPTS.relative_to(REPO)}), one per line: {PROMPT_EXAMPLE}",
        metavar="FILE")
    heldout: str | None = config_field(
        None, "held-out conversations: a FineTome-format .jsonl file, or a training run's output folder (its eval "
        "split, from run.json); default: the tiny preset's eval split of train/data/finetome_sample.jsonl",
        metavar="FILE_OR_RUN")
    out: str = config_field(DEFAULT_OUT, f"folder for {', '.join(FILES)}")

    # Sampling and context: the Space's defaults
    max_tokens: int = config_field(SAMPLING.max_new_tokens,
                                   f"most new tokens per answer, {_range(MAX_TOKENS_RANGE)} as the Space allows")
    temperature: float = config_field(SAMPLING.temperature, f"sampling temperature, {_range(TEMPERATURE_RANGE)}; "
                                      "0 = greedy (default: the Space's {default})")
    top_p: float = config_field(SAMPLING.top_p, f"nucleus sampling, {_range(TOP_P_RANGE)} (default: the Space's "
                                "{default})")
    seed: int = config_field(3407, "sampling seed: the same models, prompts and seed give the same answers")
    n_ctx: int = config_field(SPACE_N_CTX, "context length, as the Space's (default: {default}); longer held-out "
                              "conversations are cut there")
    max_conversations: int | None = config_field(None, "score only the first N held-out conversations (default: "
                                                 "all)", metavar="N")

    # What validate() read while checking the flags above (not flags themselves)
    models: list[ModelSpec] = field(init=False, default_factory=list, repr=False, compare=False)
    prompt_list: list[Prompt] = field(init=False, default_factory=list, repr=False, compare=False)
    heldout_set: HeldOut | None = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def problems(self) -> list[str]:
        """Every problem with these settings, one line each; reads the models' files, the prompts and the held-out
        set to check them, and keeps what it read."""
        problems = self._input_problems()
        for flag, value, (low, high) in (("--max-tokens", self.max_tokens, MAX_TOKENS_RANGE),
                                         ("--temperature", self.temperature, TEMPERATURE_RANGE),
                                         ("--top-p", self.top_p, TOP_P_RANGE)):
            if not (_is_number(value) and math.isfinite(value) and low <= value <= high):
                problems.append(f"{flag} {value}: must be between {low} and {high} (the Space's range)")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and 1 <= self.seed <= MAX_SEED):
            problems.append(f"--seed {self.seed}: must be between 1 and {MAX_SEED} (llama-cpp-python treats 0 as "
                            "'unset')")
        if not (isinstance(self.n_ctx, int) and not isinstance(self.n_ctx, bool)):
            problems.append(f"--n-ctx {self.n_ctx!r}: must be a whole number, at least twice --max-tokens")
        elif _is_number(self.max_tokens) and self.n_ctx < 2 * max(self.max_tokens, MAX_TOKENS_RANGE[0]):
            problems.append(f"--n-ctx {self.n_ctx}: must be at least twice --max-tokens ({2 * self.max_tokens}): the "
                            "Space gives an answer at most half the context")
        if self.max_conversations is not None and not (isinstance(self.max_conversations, int)
                                                       and self.max_conversations >= 1):
            problems.append(f"--max-conversations {self.max_conversations}: must be at least 1 (leave it out for "
                            "all)")
        if not isinstance(self.out, str):
            problems.append(f"--out {self.out!r}: give a folder path")
        elif self.out_dir.exists() and not self.out_dir.is_dir():
            problems.append(f"--out {self.out!r}: exists and is not a folder; give a folder path")
        return problems

    def _input_problems(self) -> list[str]:
        """The --model, --prompts and --heldout problems; what could be read is kept."""
        texts = [self.model] if isinstance(self.model, str) else list(self.model or [])
        self.models, problems = check_model_arguments(texts)
        self.prompt_list = []
        prompts_file = Path(self.prompts).expanduser() if self.prompts else DEFAULT_PROMPTS
        if self.prompts and not prompts_file.is_file():
            problems.append(f"--prompts {self.prompts!r}: no such file; give a JSON Lines file like "
                            f"{DEFAULT_PROMPTS.relative_to(REPO)}")
        else:
            try:
                self.prompt_list = load_prompts(prompts_file)
            except ValueError as error:
                problems.append(f"--prompts {str(self.prompts or prompts_file)!r}: {error}")
        self.heldout_set = None
        try:
            self.heldout_set = load_heldout(self.heldout)
        except (ValueError, DataError) as error:
            problems.append(f"--heldout {self.heldout!r}: {error}" if self.heldout else f"held-out set: {error}")
        return problems

    def validate(self) -> None:
        """Raise UsageError listing every problem (the CLI prints one `error:` line each and exits 2); otherwise keep
        only the first --max-conversations held-out conversations."""
        problems = self.problems()
        if problems:
            raise UsageError(problems)
        if self.max_conversations:
            self.heldout_set.conversations = self.heldout_set.conversations[: self.max_conversations]

    # ------------------------------------------------------------------ derived values
    @property
    def out_dir(self) -> Path:
        return Path(self.out).expanduser()

    @property
    def prompts_file(self) -> str:
        """The prompts file as the report names it (the shipped one relative to the repository)."""
        return str(self.prompts or DEFAULT_PROMPTS.relative_to(REPO))

    @property
    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_tokens)


# ---------------------------------------------------------------------- command line
def build_parser() -> UsageParser:
    """The comparison's flags, one per CompareConfig field: its help and default come from the field."""
    parser = UsageParser(prog="python scripts/compare.py", description=DESCRIPTION,
                         epilog="python scripts/compare.py leaderboard VOTES… prints the arena ratings of the "
                                "Space's vote logs instead (leaderboard --help)")
    add_config_flags(parser, CompareConfig)
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> CompareConfig:
    """Parse the flags and validate everything at once (UsageError, one line per problem)."""
    return CompareConfig(**vars(build_parser().parse_args(argv)))
