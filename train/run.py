#!/usr/bin/env python
"""Fine-tune Llama-3.2 1B/3B Instruct on FineTome-100k with LoRA; resume after any interruption.

    python train/run.py --preset 1b --output-dir /content/drive/MyDrive/llama-1b-finetome
    python train/run.py --preset tiny --output-dir out --max-steps 6 --save-steps 2   # offline, CPU
    python train/run.py --preset tiny-dpo --sft-adapter out/adapter --output-dir out-dpo   # DPO on top of it
    python train/run.py --help

Writes <output-dir>/checkpoint-N/, adapter/, run.json and loss.png. Rerunning the same command after a
crash continues from the newest complete checkpoint.
"""

import sys
from pathlib import Path

# Make `train` importable when run as `python train/run.py` from a fresh clone (no install step).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
