"""Our speed and memory against the alternatives, measured side by side on this machine in one run:
`python scripts/bench.py` (its flags and sections: bench/cli.py).

    shapes    the Llama-3.2-1B/3B-shaped models with random weights and their random LoRA adapters
    harness   one measured step in a fresh process (PeakMemory, measured, the --worker protocol)
    steps     the measured steps: merge, convert, quantize, bandwidth, generation, the Space
    sections  what each section measures, into docs/benchmarks.json
    summary   the headline figures, the targets' verdicts and why a target is missed
    report    docs/benchmarks.md, docs/benchmarks.png and README.md's benchmark block
    training  the tiny preset's training throughput (scripts/bench_train.py)
    waves     the Space's memory over waves of conversations (its prompt-state bound)
    cli       the command line of scripts/bench.py
"""

from pathlib import Path

from common.log import stage_logger

REPO = Path(__file__).resolve().parents[1]

log = stage_logger("bench", stream="stderr", prefix="bench: ").info  # stderr: a worker's stdout carries its result
