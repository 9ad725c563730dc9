"""ExportConfig: every export setting, its default, its flag, and its validation.

    python export/to_gguf.py --adapter outputs/tiny/adapter --quant q4_k_m q8_0 --out exports/tiny

One dataclass: each field is a flag (common/cli.py's config_field: the default and the --help in one place) and
`build_parser` is generated from the fields. The CLI and the tests build the same object; `validate()` reports every
problem at once, one line each naming the flag, the value and the fix (exit code 2), before any model is touched.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, fields
from pathlib import Path

from common.cli import UsageError, UsageParser, add_config_flags, config_field
from common.files import output_folder_problem
from common.hub import looks_like_repo_id

from .gguf import QUANT_TYPES

MERGE_DTYPES = ("float16", "bfloat16")
# Calibration text for --imatrix, in tokens (chunks of 512). Measured on SmolLM2-135M-Instruct (docs/benchmarks.md,
# "Importance matrix"): q4_k_m's mean KLD was the same from 2,048 to 16,896 calibration tokens (0.0292 to 0.0291,
# static 0.0463); 8,192 keeps four times the smallest amount that gave the whole gain, for larger models, at half the
# llama-imatrix time of 16,384.
IMATRIX_TOKENS = 8192
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*$")  # it names the files: <name>-Q4_K_M.gguf


@dataclass
class ExportConfig:
    # What to export
    adapter: str = config_field(help="the adapter/ folder a training run wrote")
    base: str | None = config_field(None, "base model (Hub id or folder); default: the adapter's own base, 16-bit")
    quant: list[str] = config_field(["q4_k_m"], f"one or more of: {', '.join(QUANT_TYPES)}", nargs="+",
                                    metavar="TYPE")

    # Where it goes
    out: str | None = config_field(None, "output folder (default: next to the adapter, gguf/)")
    name: str | None = config_field(None, "model name used in file names (default: <base name>-FineTome)")
    push: bool = config_field(False, "upload the GGUF file(s) and model card to the Hub")
    repo_id: str | None = config_field(None, "Hub model repo for --push, USER/NAME")
    private: bool = config_field(False, "create the Hub repo(s) private")
    push_merged: bool = config_field(False, "also upload merged-16bit/ to its own repo")
    merged_repo_id: str | None = config_field(None, "repo for --push-merged (default: derived from --repo-id)")
    keep_f16: bool = config_field(False, "keep the intermediate F16 GGUF")
    force: bool = config_field(False, "redo every stage even if its output is complete")

    # How it is made
    llama_cpp_dir: str | None = config_field(None, "a llama.cpp checkout whose converter to use instead")
    merge_dtype: str = config_field("float16", "dtype of the merged weights", choices=MERGE_DTYPES)
    threads: int | None = config_field(None, "quantization threads (default: usable CPUs)")
    probes: int = config_field(8, "behaviour probes: greedy answers of the merged model and each GGUF to this many "
                               "prompts (the taught questions for the demo preset, else held-out prompts); 0 skips "
                               "them, which saves minutes on a 3B export on CPU")
    probe_tokens: int = config_field(32, "answer tokens compared per probe")
    # "auto" (the flag alone): calibrate on the run's own training conversations; else the path of an imatrix.gguf.
    imatrix: str | None = config_field(
        None, "quantize the k-quants with an importance matrix (llama.cpp's llama-imatrix and llama-quantize, built "
        "once per machine): alone, computed from the run's own training conversations in its chat template "
        "(held-out excluded); with FILE, that imatrix.gguf. The matrix is saved and pushed beside the GGUFs",
        nargs="?", const="auto", metavar="FILE")
    imatrix_tokens: int = config_field(IMATRIX_TOKENS, "calibration text for --imatrix, in tokens (default: "
                                       "{default}, measured in docs/benchmarks.md)")

    def __post_init__(self):
        if isinstance(self.quant, str):
            self.quant = [self.quant]
        if isinstance(self.quant, list):
            self.quant = [q.lower() if isinstance(q, str) else q for q in self.quant]
        self.validate()

    # ------------------------------------------------------------------ validation
    def problems(self) -> list[str]:
        """Every problem with these settings, one line each naming the flag, the value and the fix."""
        problems: list[str] = []

        def at_least(flag: str, value, low: int, note: str = "") -> None:
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{flag} {value!r}: must be a whole number >= {low}{note}")
            elif value < low:
                problems.append(f"{flag} {value}: must be >= {low}{note}")

        quants = self.quant if isinstance(self.quant, list) else []
        unknown = [str(q) for q in quants if q not in QUANT_TYPES]
        if unknown or not quants:
            problems.append(f"--quant {' '.join(unknown) or '(none)'}: unknown quant type; choose from: "
                            f"{', '.join(QUANT_TYPES)}")
        problems += self._adapter_problems()
        if self.push and not self.repo_id:
            problems.append("--push: needs --repo-id USER/NAME")
        for flag, value in (("--repo-id", self.repo_id), ("--merged-repo-id", self.merged_repo_id)):
            if value is not None and not (isinstance(value, str) and looks_like_repo_id(value)):
                problems.append(f"{flag} {value!r}: must look like USER/NAME (letters, digits, '-', '_', '.')")
        if self.push_merged and not self.push:
            problems.append("--push-merged: only together with --push")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                problems.append(f"--{f.name.replace('_', '-')} {getattr(self, f.name)!r}: choose one of: "
                                f"{', '.join(choices)}")
        if self.threads is not None:
            at_least("--threads", self.threads, 1)
        at_least("--probes", self.probes, 0, " (0 skips the behaviour probes)")
        at_least("--probe-tokens", self.probe_tokens, 1)
        problems += self._imatrix_problems(quants)
        at_least("--imatrix-tokens", self.imatrix_tokens, 1024, " (two chunks of 512 tokens)")
        problems += self._out_problems()
        if self.name is not None and not (isinstance(self.name, str) and NAME_PATTERN.match(self.name)):
            problems.append(f"--name {self.name!r}: use letters, digits, '-', '_' and '.' (it names the files)")
        return problems

    def _adapter_problems(self) -> list[str]:
        if not isinstance(self.adapter, str) or not self.adapter.strip():
            return [f"--adapter {self.adapter!r}: give the adapter/ folder a training run wrote "
                    "(e.g. outputs/tiny/adapter)"]
        adapter = self.adapter_dir
        if not adapter.is_dir():
            return [f"--adapter {self.adapter!r}: folder not found; give the adapter/ folder a training run wrote "
                    "(e.g. outputs/tiny/adapter)"]
        if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
            return [f"--adapter {self.adapter!r}: incomplete adapter (needs adapter_config.json and "
                    "adapter_model.safetensors); rerun training to finish it"]
        return []

    def _imatrix_problems(self, quants: list) -> list[str]:
        if self.imatrix is None:
            return []
        problems = []
        imatrix_quants = [q for q, t in QUANT_TYPES.items() if t.imatrix]
        if not any(q in imatrix_quants for q in quants):
            problems.append(f"--imatrix: only k-quants use an importance matrix ({', '.join(imatrix_quants)}); "
                            f"add one to --quant, or leave --imatrix out")
        if self.imatrix != "auto" and not (isinstance(self.imatrix, str) and Path(self.imatrix).expanduser().is_file()):
            problems.append(f"--imatrix {self.imatrix!r}: file not found; give an imatrix.gguf made by "
                            "llama-imatrix, or --imatrix alone to calibrate on the run's own data")
        return problems

    def _out_problems(self) -> list[str]:
        if self.out is not None and not isinstance(self.out, str):
            return [f"--out {self.out!r}: give a folder path"]
        if not self.out and not isinstance(self.adapter, str):
            return []  # the default output folder lies beside the adapter, already reported
        if problem := output_folder_problem(self.out_dir):
            flag = f"--out {self.out!r}" if self.out else f"the default output folder {str(self.out_dir)!r}"
            return [f"{flag}: {problem}; choose a folder this user can write (--out)"]
        return []

    def validate(self) -> None:
        """Raise UsageError listing every problem (the CLI prints one `error:` line each and exits 2)."""
        problems = self.problems()
        if problems:
            raise UsageError(problems)

    # ------------------------------------------------------------------ derived values
    @property
    def adapter_dir(self) -> Path:
        return Path(self.adapter).expanduser()

    @property
    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out).expanduser()
        return self.adapter_dir.parent / "gguf"


# ---------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    """The export's flags, one per ExportConfig field: its help and default come from the field."""
    parser = UsageParser(
        prog="python export/to_gguf.py",
        description="Merge a LoRA adapter into its 16-bit base, convert to GGUF with llama.cpp's own converter, "
        "quantize through llama-cpp-python, verify the result, and optionally push it with a model card.",
    )
    add_config_flags(parser, ExportConfig)
    return parser


def config_from_args(argv: list[str] | None = None) -> ExportConfig:
    """Parse the flags and validate everything at once (UsageError, one line per problem)."""
    return ExportConfig(**vars(build_parser().parse_args(argv)))
