"""ExportConfig: every export setting, its flag, and its validation (all problems at once, exit code 2)."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import UsageError, UsageParser
from common.files import output_folder_problem
from common.hub import looks_like_repo_id

from .gguf import QUANT_TYPES

MERGE_DTYPES = ("float16", "bfloat16")
# Calibration text for --imatrix, in tokens (chunks of 512). Measured on SmolLM2-135M-Instruct (docs/benchmarks.md,
# "Importance matrix"): q4_k_m's mean KLD was the same from 2,048 to 16,896 calibration tokens (0.0292 to 0.0291,
# static 0.0463); 8,192 keeps four times the smallest amount that gave the whole gain, for larger models, at half the
# llama-imatrix time of 16,384.
IMATRIX_TOKENS = 8192


@dataclass
class ExportConfig:
    adapter: str
    base: str | None = None
    quant: list[str] = field(default_factory=lambda: ["q4_k_m"])
    out: str | None = None
    name: str | None = None
    push: bool = False
    repo_id: str | None = None
    private: bool = False
    push_merged: bool = False
    merged_repo_id: str | None = None
    keep_f16: bool = False
    force: bool = False
    llama_cpp_dir: str | None = None
    merge_dtype: str = "float16"
    threads: int | None = None
    probes: int = 8
    probe_tokens: int = 32
    imatrix: str | None = None  # "auto": calibrate on the run's own training conversations; else an imatrix.gguf
    imatrix_tokens: int = IMATRIX_TOKENS

    def __post_init__(self):
        self.quant = [q.lower() for q in self.quant]
        problems = []
        unknown = [q for q in self.quant if q not in QUANT_TYPES]
        if unknown or not self.quant:
            problems.append(f"--quant {' '.join(unknown) or '(none)'}: unknown quant type; choose from: "
                            f"{', '.join(QUANT_TYPES)}")
        adapter = Path(self.adapter).expanduser()
        if not adapter.is_dir():
            problems.append(f"--adapter {self.adapter!r}: folder not found; give the adapter/ folder a training run "
                            "wrote (e.g. outputs/tiny/adapter)")
        elif not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
            problems.append(f"--adapter {self.adapter!r}: incomplete adapter (needs adapter_config.json and "
                            "adapter_model.safetensors); rerun training to finish it")
        if self.push and not self.repo_id:
            problems.append("--push: needs --repo-id USER/NAME")
        for flag, value in (("--repo-id", self.repo_id), ("--merged-repo-id", self.merged_repo_id)):
            if value is not None and not looks_like_repo_id(value):
                problems.append(f"{flag} {value!r}: must look like USER/NAME (letters, digits, '-', '_', '.')")
        if self.push_merged and not self.push:
            problems.append("--push-merged: only together with --push")
        if self.merge_dtype not in MERGE_DTYPES:
            problems.append(f"--merge-dtype {self.merge_dtype!r}: choose one of: {', '.join(MERGE_DTYPES)}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"--threads {self.threads}: must be >= 1")
        if not isinstance(self.probes, int) or self.probes < 0:
            problems.append(f"--probes {self.probes}: must be >= 0 (0 skips the behaviour probes)")
        if not isinstance(self.probe_tokens, int) or self.probe_tokens < 1:
            problems.append(f"--probe-tokens {self.probe_tokens}: must be >= 1")
        if self.imatrix is not None:
            imatrix_quants = [q for q, t in QUANT_TYPES.items() if t.imatrix]
            if not any(q in imatrix_quants for q in self.quant):
                problems.append(f"--imatrix: only k-quants use an importance matrix ({', '.join(imatrix_quants)}); "
                                f"add one to --quant, or leave --imatrix out")
            if self.imatrix != "auto" and not Path(self.imatrix).expanduser().is_file():
                problems.append(f"--imatrix {self.imatrix!r}: file not found; give an imatrix.gguf made by "
                                "llama-imatrix, or --imatrix alone to calibrate on the run's own data")
        if not isinstance(self.imatrix_tokens, int) or self.imatrix_tokens < 1024:
            problems.append(f"--imatrix-tokens {self.imatrix_tokens}: must be >= 1024 (two chunks of 512 tokens)")
        if problem := output_folder_problem(self.out_dir):
            flag = f"--out {self.out!r}" if self.out else f"the default output folder {str(self.out_dir)!r}"
            problems.append(f"{flag}: {problem}; choose a folder this user can write (--out)")
        if self.name is not None and not re.match(r"^[A-Za-z0-9][\w.-]*$", self.name):
            problems.append(f"--name {self.name!r}: use letters, digits, '-', '_' and '.' (it names the files)")
        if problems:
            raise UsageError(problems)

    @property
    def adapter_dir(self) -> Path:
        return Path(self.adapter).expanduser()

    @property
    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out).expanduser()
        return self.adapter_dir.parent / "gguf"


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog="python export/to_gguf.py",
        description="Merge a LoRA adapter into its 16-bit base, convert to GGUF with llama.cpp's own converter, "
        "quantize through llama-cpp-python, verify the result, and optionally push it with a model card.",
    )
    parser.add_argument("--adapter", required=True, help="the adapter/ folder a training run wrote")
    parser.add_argument("--base", help="base model (Hub id or folder); default: the adapter's own base, 16-bit")
    parser.add_argument("--quant", nargs="+", default=["q4_k_m"], metavar="TYPE",
                        help=f"one or more of: {', '.join(QUANT_TYPES)} (default: q4_k_m)")
    parser.add_argument("--out", help="output folder (default: next to the adapter, gguf/)")
    parser.add_argument("--name", help="model name used in file names (default: <base name>-FineTome)")
    parser.add_argument("--push", action="store_true", help="upload the GGUF file(s) and model card to the Hub")
    parser.add_argument("--repo-id", help="Hub model repo for --push, USER/NAME")
    parser.add_argument("--private", action="store_true", help="create the Hub repo(s) private")
    parser.add_argument("--push-merged", action="store_true", help="also upload merged-16bit/ to its own repo")
    parser.add_argument("--merged-repo-id", help="repo for --push-merged (default: derived from --repo-id)")
    parser.add_argument("--keep-f16", action="store_true", help="keep the intermediate F16 GGUF")
    parser.add_argument("--force", action="store_true", help="redo every stage even if its output is complete")
    parser.add_argument("--llama-cpp-dir", help="a llama.cpp checkout whose converter to use instead")
    parser.add_argument("--merge-dtype", default="float16", help="merged weights: float16 (default) or bfloat16")
    parser.add_argument("--threads", type=int, help="quantization threads (default: usable CPUs)")
    parser.add_argument("--probes", type=int, default=8,
                        help="behaviour probes: greedy answers of the merged model and each GGUF to this many prompts "
                             "(the taught questions for the demo preset, else held-out prompts); 0 skips them, which "
                             "saves minutes on a 3B export on CPU (default: 8)")
    parser.add_argument("--probe-tokens", type=int, default=32,
                        help="answer tokens compared per probe (default: 32)")
    parser.add_argument("--imatrix", nargs="?", const="auto", metavar="FILE",
                        help="quantize the k-quants with an importance matrix (llama.cpp's llama-imatrix and "
                             "llama-quantize, built once per machine): alone, computed from the run's own training "
                             "conversations in its chat template (held-out excluded); with FILE, that imatrix.gguf. "
                             "The matrix is saved and pushed beside the GGUFs")
    parser.add_argument("--imatrix-tokens", type=int, default=IMATRIX_TOKENS,
                        help=f"calibration text for --imatrix, in tokens (default: {IMATRIX_TOKENS}, measured in "
                             "docs/benchmarks.md)")
    return parser


def config_from_args(argv: list[str] | None = None) -> ExportConfig:
    return ExportConfig(**vars(build_parser().parse_args(argv)))
