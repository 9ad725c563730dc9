#!/usr/bin/env python
"""Compare GGUF chat models as the Space serves them: held-out perplexity, speed, stopping, answers side by side.

    python scripts/compare.py --model 1B=USER/Llama-3.2-1B-Instruct-FineTome-GGUF \\
                              --model 3B=USER/Llama-3.2-3B-Instruct-FineTome-GGUF --out reports/1b-vs-3b

The code is the package compare/ (compare.config holds the flags; `--help` lists them).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's packages, from a fresh clone

from compare.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
