#!/usr/bin/env python
"""Merge a LoRA adapter into 16-bit weights, convert and quantize to GGUF with llama.cpp's own tools, verify.

    python export/to_gguf.py --adapter outputs/tiny/adapter --out exports/tiny
    python export/to_gguf.py --adapter DIR --quant q4_k_m q8_0 --push --repo-id USER/Llama-3.2-1B-FineTome-GGUF

Writes <out>/merged-16bit/, <out>/<Name>-Q4_K_M.gguf, <out>/report.json and <out>/README.md (the model card).
A rerun skips the stages whose outputs are complete; --force redoes them.
"""

import sys
from pathlib import Path

# Make the repo's packages importable when run as `python export/to_gguf.py` from a fresh clone.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
