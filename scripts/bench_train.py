#!/usr/bin/env python
"""Training throughput of the tiny preset on this machine's CPU -> the training section of docs/benchmarks.md.

    python scripts/bench_train.py [--repeats 3] [--steps 10]

The measurement and the section's text: bench/training.py.
"""

import sys
from pathlib import Path

# Make the repo's packages importable when run as `python scripts/bench_train.py` from a fresh clone.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.training import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
