#!/usr/bin/env python
"""Our speed and memory against the alternatives, measured side by side on this machine in one run.

    python scripts/bench.py                                # everything: about 30 minutes on 2 cores
    python scripts/bench.py --sizes 1b --repeats 2         # quicker
    python scripts/bench.py --sections generation,space    # some sections; the others keep their last figures
    python scripts/bench.py --render-only                  # rewrite the report from docs/benchmarks.json

Writes docs/benchmarks.md (and the table in README.md between its benchmark markers), docs/benchmarks.png and
docs/benchmarks.json (every raw figure). The sections and the models they measure: `--help`, and the bench/
package (bench/cli.py).
"""

import sys
from pathlib import Path

# Make the repo's packages importable when run as `python scripts/bench.py` from a fresh clone; first, so that
# `bench` is the package, not this file.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
