"""Training throughput of the tiny preset on this machine's CPU -> the training section of docs/benchmarks.md.

    python scripts/bench_train.py [--repeats 3] [--steps 10]

Runs the real CLI (`train/run.py --preset tiny`) several times in fresh output folders and reports the median
tokens/s (all input tokens, eval and checkpointing excluded: --eval-samples 0, one save at the end) and peak RSS.
The unsloth-vs-hf comparison needs a CUDA GPU; without one the section says it was not measured.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time

from bench import REPO
from common.cli import UsageError, UsageParser
from common.files import write_text_atomic
from common.machine import cpu_name, usable_cpus
from train.summary import RunSummary, load_run_summary

BENCHMARKS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- training:begin -->", "<!-- training:end -->"


def one_run(steps: int) -> RunSummary:
    """One tiny-preset training run of `steps` optimizer steps through the real CLI; its run.json."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, str(REPO / "train/run.py"), "--preset", "tiny", "--output-dir", folder,
                   "--max-steps", str(steps), "--save-steps", str(steps), "--eval-samples", "0"]
        subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
        return load_run_summary(folder)


def measure(repeats: int, steps: int) -> dict:
    """Median tokens/s and peak RSS of `repeats` fresh tiny-preset runs of `steps` optimizer steps."""
    runs = [one_run(steps) for _ in range(repeats)]
    rates = [r.tokens_per_second for r in runs]
    rss = [r.peak_rss_mb for r in runs]
    import torch

    return dict(repeats=repeats, steps=steps, tokens_per_second=rates, median_tokens_per_second=statistics.median(rates),
                peak_rss_mb=statistics.median(rss), batch_size=runs[0].config["batch_size"],
                grad_accum=runs[0].config["grad_accum"], cpu=cpu_name(), cores=usable_cpus(),
                torch=torch.__version__)


def render(result: dict, measured: str, command: str, machine: dict | None = None) -> str:
    """The training section of docs/benchmarks.md, between its markers: the machine the result names, else
    `machine` (the benchmark run's, for results recorded before they named it), else this one."""
    import torch

    here = machine or {"cpu": cpu_name(), "cores": usable_cpus(), "torch": torch.__version__}
    cpu, cores, torch_version = (result.get(key, here[key]) for key in ("cpu", "cores", "torch"))
    rates = result["tokens_per_second"]
    return f"""{BEGIN}
## Training

Measured {measured} on {cpu}, {cores} usable cores, torch {torch_version},
by `{command}`.

| what | backend | device | median tokens/s | runs (tokens/s) | peak RSS |
|---|---|---|---|---|---|
| tiny preset ({result['batch_size']}×{result['grad_accum']} conversations/step, {result['steps']} steps, fp32) | hf | CPU | {result['median_tokens_per_second']:.0f} | {', '.join(f'{r:.0f}' for r in rates)} | {result['peak_rss_mb']:.0f} MB |
| unsloth vs hf on a 1B-shaped model: tokens/s, peak VRAM, kill and resume | unsloth, hf | CUDA | not measured | — | — |

Tokens/s counts every input token (prompt and answer, no padding) over the training loop's wall time. The tiny
model's cost is dominated by its 128,256 × 256 output layer, so these figures say how fast the pipeline's
mechanics run here, not how fast a 1B model trains.

The unsloth-vs-hf comparison was **not measured**: no CUDA GPU was lent to the task that built the training
stage. It needs a GPU machine: train a locally built 1B-shaped model for ~20 steps with each backend (including
a kill and resume) and record tokens/s and peak VRAM here.
{END}"""


def replace_section(text: str, section: str, begin: str = BEGIN, end: str = END) -> str:
    r"""`text` with the block between `begin` and `end` (markers included) replaced by `section`, or appended.

    >>> replace_section("intro\n<a>old</a>\nend\n", "<a>new</a>", "<a>", "</a>")
    'intro\n<a>new</a>\nend\n'
    >>> replace_section("# Benchmarks\n", "<a>new</a>", "<a>", "</a>")
    '# Benchmarks\n\n<a>new</a>\n'
    """
    if begin in text:
        return text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    return text.rstrip() + "\n\n" + section + "\n"


def main(argv: list[str] | None = None) -> int:
    """scripts/bench_train.py: measure, rewrite the training section of docs/benchmarks.md, print it."""
    parser = UsageParser(prog="python scripts/bench_train.py", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    try:
        args = parser.parse_args(argv)
        if problems := [f"--{name} {value}: must be at least 1" for name, value in
                        (("repeats", args.repeats), ("steps", args.steps)) if value < 1]:
            raise UsageError(problems)
    except UsageError as error:
        return error.report()
    result = measure(args.repeats, args.steps)
    section = render(result, time.strftime("%Y-%m-%d"),
                     f"python scripts/bench_train.py --repeats {args.repeats} --steps {args.steps}")
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    BENCHMARKS.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(BENCHMARKS, replace_section(text, section))
    print(section)
    return 0
