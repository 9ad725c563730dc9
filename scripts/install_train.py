#!/usr/bin/env python
"""Install what training needs; on Colab, keep the torch the runtime ships with (the Colab notebook's first cell).

    python scripts/install_train.py             # Colab: keeps its torch; elsewhere: pip install -r requirements-train.txt
    python scripts/install_train.py --print     # the pip commands only
    python scripts/install_train.py --dry-run   # pip resolves each step into a JSON report; installs nothing

What it installs and why: train/install.py.
"""

import sys
from pathlib import Path

# Make the repo's packages importable when run as `python scripts/install_train.py` from a fresh clone.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.install import main

if __name__ == "__main__":
    sys.exit(main())
