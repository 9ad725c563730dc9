"""What the Hugging Face Hub accepts as a repo id, checked the same way by every stage."""

from __future__ import annotations

import re

# USER/NAME: each part starts with a letter or digit, then letters, digits, '_', '.', '-', at most 96 characters.
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", re.ASCII)


def looks_like_repo_id(text: str) -> bool:
    """Whether `text` has the shape of a Hub repo id (the Hub itself has the last word on whether it exists).

    >>> [looks_like_repo_id(t) for t in ["unsloth/Llama-3.2-1B-Instruct", "finetome", "./out/adapter", "a/b/c"]]
    [True, False, False, False]
    """
    return bool(REPO_ID.fullmatch(text))
