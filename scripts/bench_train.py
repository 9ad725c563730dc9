#!/usr/bin/env python
"""Training throughput of the tiny preset on this machine's CPU -> the training section of docs/benchmarks.md.

    python scripts/bench_train.py [--repeats 3] [--steps 10]

Runs the real CLI (`train/run.py --preset tiny`) several times in fresh output folders and reports the median
tokens/s (all input tokens, eval and checkpointing excluded: --eval-samples 0, one save at the end) and peak RSS.
The unsloth-vs-hf comparison needs a CUDA GPU; without one the section says it was not measured.
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- training:begin -->", "<!-- training:end -->"


def one_run(steps: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, str(REPO / "train/run.py"), "--preset", "tiny", "--output-dir", folder,
                   "--max-steps", str(steps), "--save-steps", str(steps), "--eval-samples", "0"]
        subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
        return json.loads((Path(folder) / "run.json").read_text())


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    import os

    import torch

    runs = [one_run(args.steps) for _ in range(args.repeats)]
    rates = [r["tokens_per_second"] for r in runs]
    rss = [r["peak_rss_mb"] for r in runs]
    cores = len(os.sched_getaffinity(0))
    section = f"""{BEGIN}
## Training

Measured {time.strftime('%Y-%m-%d')} on {cpu_name()}, {cores} usable cores, torch {torch.__version__},
by `python scripts/bench_train.py --repeats {args.repeats} --steps {args.steps}`.

| what | backend | device | median tokens/s | runs (tokens/s) | peak RSS |
|---|---|---|---|---|---|
| tiny preset ({runs[0]['config']['batch_size']}×{runs[0]['config']['grad_accum']} conversations/step, {args.steps} steps, fp32) | hf | CPU | {statistics.median(rates):.0f} | {', '.join(f'{r:.0f}' for r in rates)} | {statistics.median(rss):.0f} MB |
| unsloth vs hf on a 1B-shaped model: tokens/s, peak VRAM, kill and resume | unsloth, hf | CUDA | not measured | — | — |

Tokens/s counts every input token (prompt and answer, no padding) over the training loop's wall time. The tiny
model's cost is dominated by its 128,256 × 256 output layer, so these figures say how fast the pipeline's
mechanics run here, not how fast a 1B model trains.

The unsloth-vs-hf comparison was **not measured**: no CUDA GPU was lent to the task that built the training
stage. It needs a GPU machine: train a locally built 1B-shaped model for ~20 steps with each backend (including
a kill and resume) and record tokens/s and peak VRAM here.
{END}"""
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n\nMeasured, not asserted: each section says how and where it was measured.\n\n"
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    BENCHMARKS.parent.mkdir(parents=True, exist_ok=True)
    BENCHMARKS.write_text(text)
    print(section)


if __name__ == "__main__":
    main()
