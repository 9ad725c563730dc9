"""The Hugging Face Hub as every stage meets it: what a repo id looks like, where the token comes from, and the Hub's
and the network's failures as one line that says what failed and how to fix it. export/hub.py pushes models with
these, deploy/ the Space.

The token is only ever returned to the caller (for `HfApi(token=...)`): nothing here prints, logs or stores it, and
it is masked in any text of the Hub's that goes into a message. A problem is a `HubError` (one line, exit 1 at the
command line); export/hub.py reports it as the export's own ExportError. huggingface_hub is imported where it is
used, so the repo-id shape check stays standard-library only (train/config.py imports this module).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

# USER/NAME: each part starts with a letter or digit, then letters, digits, '_', '.', '-', at most 96 characters.
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", re.ASCII)
NO_TOKEN = "no Hugging Face token: set HF_TOKEN or run `hf auth login`"
# The fix for the HTTP statuses a push or a deploy typically meets; others get the Hub's own message.
HTTP_FIXES = {
    401: "the Hub did not accept the token: set a valid HF_TOKEN or run `hf auth login` again",
    403: "the token may not create or write this repo: use a token with write access to its namespace",
    429: "the Hub is rate-limiting this account: wait a few minutes and push again",
}


class HubError(RuntimeError):
    """A problem with the Hub the user can fix: what failed, with which value, and the fix, on one line."""


def looks_like_repo_id(text: str) -> bool:
    """Whether `text` has the shape of a Hub repo id (the Hub itself has the last word on whether it exists).

    >>> [looks_like_repo_id(t) for t in ["unsloth/Llama-3.2-1B-Instruct", "finetome", "./out/adapter", "a/b/c"]]
    [True, False, False, False]
    """
    return bool(REPO_ID.fullmatch(text))


def validate_repo_id(value: str, flag: str) -> str:
    """A repo id as "user/name" with the characters the Hub allows; the flag names the option in errors.

    >>> validate_repo_id("alice/Llama-3.2-1B-Instruct-FineTome-GGUF", "--repo-id")
    'alice/Llama-3.2-1B-Instruct-FineTome-GGUF'
    >>> validate_repo_id("finetome-GGUF", "--repo-id")
    Traceback (most recent call last):
    common.hub.HubError: --repo-id 'finetome-GGUF': expected USER/NAME (a user or organization, then the repo)
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id as check_hub_repo_id

    if value.count("/") != 1:
        raise HubError(f"{flag} {value!r}: expected USER/NAME (a user or organization, then the repo)")
    try:
        check_hub_repo_id(value)
    except HFValidationError as error:
        raise HubError(f"{flag} {value!r}: use only letters, digits, '-', '_' and '.', not at the start or end "
                       "of either part, no '--' or '..', at most 96 characters each, no '.git' ending") from error
    return value


def get_token() -> str | None:
    """The token `hf auth login` saved, or None (huggingface_hub's own lookup; tests replace this function)."""
    from huggingface_hub import get_token as saved_login

    return saved_login()


def resolve_token(env: Mapping[str, str] | None = None, missing: str = NO_TOKEN) -> str:
    """HF_TOKEN from the environment, else the token saved by `hf auth login`; HubError(missing) when neither is
    there (each command says what it needs the token for)."""
    env = os.environ if env is None else env  # now, not at import time
    token = env.get("HF_TOKEN", "").strip() or get_token()
    if not token:
        raise HubError(missing)
    return token


def masked_line(text: object, token: str | None) -> str:
    """The Hub's text on one line, the token masked in case something on the way echoed it.

    >>> masked_line("Payment required:\\n  subscribe  to PRO hf_x", "hf_x")
    'Payment required: subscribe to PRO ***'
    """
    text = " ".join(str(text).split())
    return text.replace(token, "***") if token else text


@contextmanager
def hub_errors(action: str, token: str | None, fixes: Mapping[int, str] = HTTP_FIXES,
               retry: str = "push again") -> Iterator[None]:
    """Turn the Hub's and the network's exceptions into one-line HubErrors that say what failed (`action`, e.g.
    "pushing to user/model") and how to fix it (`fixes` by HTTP status, else the Hub's own text; `retry` after a
    network failure), never the token."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        fix = fixes.get(status) or masked_line(error.server_message or "no message from the Hub", token)
        raise HubError(f"{action} failed (HTTP {status}): {fix}") from error
    except (httpx.HTTPError, OfflineModeIsEnabled) as error:
        raise HubError(f"{action} failed: cannot reach the Hugging Face Hub ({type(error).__name__}); "
                       f"check the network and that HF_HUB_OFFLINE is not set, then {retry}") from error
