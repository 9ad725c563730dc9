#!/usr/bin/env python
"""Deploy the chat Space: create (or update) a Gradio Space on CPU hardware that serves the q4_k_m GGUFs, wait for its
build and chat once with every model. Creating a Gradio Space needs a paid Hugging Face plan (PRO, or an organization
on Team or Enterprise); any account may update a Space that exists; `python space/app.py --share` is the free way.

    python scripts/deploy_space.py --space-id USER/finetome-chat --model-1b USER/Llama-3.2-1B-Instruct-FineTome-GGUF \
        --model-3b USER/Llama-3.2-3B-Instruct-FineTome-GGUF
    python scripts/deploy_space.py --space-id USER/finetome-chat --model-1b USER/X-GGUF --dry-run out/space
    python scripts/deploy_space.py --space-id USER/finetome-chat --model-1b … --model-3b … --base-models \
        --votes-repo USER/finetome-votes --report reports/1b-vs-3b   # the arena: fine-tunes vs bases, votes, report
    python scripts/deploy_space.py --space-id USER/finetome-chat --model-1b … --no-wait   # commit and return

The logic, and what the Space gets, is in the package deploy/ (deploy/cli.py first).
"""

import sys
from pathlib import Path

# Make the repo's packages importable when run as `python scripts/deploy_space.py` from a fresh clone.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
