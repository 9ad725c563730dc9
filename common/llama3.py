"""Facts about Llama 3.x Instruct models and the files this project names, written once for every stage."""

from __future__ import annotations

import os
from pathlib import Path

# Special tokens of the Llama-3 tokenizer (256 after the 128,000 base ranks) and their ids.
BOS, EOT, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
BOS_ID, EOT_ID, PAD_ID = 128000, 128009, 128004
END_OF_TEXT_ID, END_OF_MESSAGE_ID = 128001, 128008  # with EOT_ID, the ids generation_config.json stops on

# The Llama-3.1/3.2 Instruct chat template, and the date it is rendered with: fixed, so that two renderings of one
# conversation (training's, llama.cpp's, the export's checks) agree whatever the day.
TEMPLATE_PATH = Path(__file__).parent / "templates" / "llama-3.2-instruct.jinja"
TEMPLATE_DATE = "26 Jul 2024"

DATASET = "mlabonne/FineTome-100k"

# llama.cpp's GGUF naming: <Name>-Q4_K_M.gguf; a Hub repo's q4_k_m file is found with this glob.
Q4_K_M_GLOB = "*Q4_K_M.gguf"


def cache_root() -> Path:
    """Where the project keeps what it builds or fetches once: $FINETOME_CACHE, default ~/.cache/finetome-pipeline."""
    return Path(os.environ.get("FINETOME_CACHE", Path.home() / ".cache" / "finetome-pipeline"))
