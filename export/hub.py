"""Push an export to the Hugging Face Hub: the GGUF files and their model card in one commit, and optionally the
merged 16-bit model to a repo of its own.

    HF_TOKEN=hf_... python export/to_gguf.py ... --push

The token is read by `resolve_token` and handed only to `HfApi(token=...)`; nothing here prints, logs, stores or
puts it in a message. Hub failures become one-line `ExportError`s naming the repo and the fix. The Hub helpers the
deploy shares (the token, the repo-id check, the Hub's errors) live in common/hub.py; the ones here are the same,
raising the export's own ExportError, which export/cli.py and compare/ report.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import CommitOperationAdd

from common import hub as shared
from common.hub import HTTP_FIXES, HubError
from export.errors import ExportError

NO_TOKEN = "--push needs a Hugging Face token: set HF_TOKEN or run `hf auth login`"
GGUF_SUFFIX = "-GGUF"
MERGED_SUFFIX = "-merged-16bit"
# Never uploaded from the merged folder: files written under a temporary name and renamed when complete, and the
# export's own bookkeeping (manifests). upload_folder matches these globs against paths relative to the folder.
MERGED_IGNORE_PATTERNS = ["*.tmp", "*.tmp/*", "*.partial", "*.lock", "*manifest.json"]


@contextmanager
def as_export_error() -> Iterator[None]:
    """common/hub.py's HubError as the export's ExportError: the same message, chained to the same cause."""
    try:
        yield
    except HubError as error:
        raise ExportError(str(error)) from error.__cause__


def resolve_token(env: Mapping[str, str] | None = None) -> str:
    """HF_TOKEN from the environment, else the token saved by `hf auth login` (common/hub.py)."""
    with as_export_error():
        return shared.resolve_token(env, missing=NO_TOKEN)


def validate_repo_id(value: str, flag: str) -> str:
    """A model repo id as "user/name" with the characters the Hub allows (common/hub.py); the flag names the option.

    >>> validate_repo_id("finetome-GGUF", "--repo-id")
    Traceback (most recent call last):
    export.errors.ExportError: --repo-id 'finetome-GGUF': expected USER/NAME (a user or organization, then the repo)
    """
    with as_export_error():
        return shared.validate_repo_id(value, flag)


@contextmanager
def hub_errors(action: str, token: str | None, fixes: Mapping[int, str] = HTTP_FIXES,
               retry: str = "push again") -> Iterator[None]:
    """common/hub.py's hub_errors, raising ExportError: what failed (`action`) and the fix, never the token."""
    with as_export_error(), shared.hub_errors(action, token, fixes, retry):
        yield


def merged_repo_id_for(repo_id: str) -> str:
    """Where the merged 16-bit model goes next to a GGUF repo: the GGUF repo's id with a trailing "-GGUF" (any case)
    dropped, the common naming on the Hub (X for the weights, X-GGUF for the quants); otherwise with
    "-merged-16bit" appended, so the two repos never collide.

    >>> merged_repo_id_for("alice/Llama-3.2-1B-Instruct-FineTome-GGUF")
    'alice/Llama-3.2-1B-Instruct-FineTome'
    >>> merged_repo_id_for("alice/finetome-1b")
    'alice/finetome-1b-merged-16bit'
    """
    if repo_id.upper().endswith(GGUF_SUFFIX):
        return repo_id[: -len(GGUF_SUFFIX)]
    return repo_id + MERGED_SUFFIX


def check_push_access(client, repo_ids: list[str]) -> str:
    """Before any work: the Hub accepts the token, the token may write, and every repo to push to is in the token
    user's own namespace or one of their organizations'. Returns the user's name; one-line ExportError otherwise.
    (A fine-grained token's scopes are not listed by whoami: the push itself has the last word on those.)"""
    token = getattr(client, "token", None)
    with hub_errors("checking the token with the Hugging Face Hub", token, retry="export again"):
        info = client.whoami()
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise ExportError("--push: the token is read-only; create one with write access at "
                          "https://huggingface.co/settings/tokens, set HF_TOKEN (or `hf auth login`), export again")
    user = info.get("name", "?")
    namespaces = {user} | {org.get("name") for org in info.get("orgs") or [] if org.get("name")}
    for repo_id in repo_ids:
        owner = repo_id.split("/", 1)[0]
        if owner not in namespaces:
            raise ExportError(f"{repo_id}: the token belongs to {user!r}, who cannot create repos under {owner!r}; "
                              f"use a repo id under {', '.join(sorted(namespaces))}")
    return user


def _check_local_inputs(files: list[Path], merged_dir: Path | None) -> None:
    """Everything that can be checked before the first request, all problems at once."""
    problems = [f"{path} is not a file" for path in files if not path.is_file()]
    names = [path.name for path in files]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        problems.append(f"two files would have the same name in the repo: {', '.join(duplicates)}")
    if "README.md" in names:
        problems.append("README.md is written from the model card; leave it out of the files")
    if merged_dir is not None and not merged_dir.is_dir():
        problems.append(f"merged model folder {merged_dir} does not exist")
    if not files:
        problems.append("no GGUF file to push")
    if problems:
        raise ExportError("cannot push: " + "; ".join(problems))


def push_export(client, repo_id: str, files: list[Path], card: str, private: bool, merged_dir: Path | None = None,
                merged_repo_id: str | None = None) -> dict:
    """Create `repo_id` if needed and commit `files` (under their own names) plus README.md (the card) in one commit.

    client has HfApi's interface: HfApi(token=resolve_token()) in real use. `private` applies when a repo is created;
    an existing repo keeps its visibility. With `merged_dir`, the merged 16-bit model is uploaded to
    `merged_repo_id` (default: `merged_repo_id_for(repo_id)`). Returns {"repo_url", "merged_repo_url" (or None)}.
    """
    files = [Path(path) for path in files]
    merged_dir = Path(merged_dir) if merged_dir is not None else None
    _check_local_inputs(files, merged_dir)
    if merged_dir is not None:
        if merged_repo_id is None:
            merged_repo_id = validate_repo_id(merged_repo_id_for(repo_id), f"the merged repo id derived from {repo_id}")
        if merged_repo_id == repo_id:
            raise ExportError(f"the merged model and the GGUF files would both go to {repo_id}: "
                              "choose a different merged repo id")
    # HfApi keeps its token in .token; used only to mask it should the Hub's text ever contain it.
    token = getattr(client, "token", None)

    names = [path.name for path in files]
    operations = [CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=path) for path in files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    with hub_errors(f"pushing to {repo_id}", token):
        repo_url = client.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        client.create_commit(repo_id, operations, commit_message=f"Upload {', '.join(names)} and README.md",
                             repo_type="model")

    merged_repo_url = None
    if merged_dir is not None:
        with hub_errors(f"pushing to {merged_repo_id}", token):
            merged_repo_url = client.create_repo(merged_repo_id, repo_type="model", private=private, exist_ok=True)
            client.upload_folder(repo_id=merged_repo_id, folder_path=merged_dir, repo_type="model",
                                 commit_message=f"Upload the merged 16-bit model behind {repo_id}",
                                 ignore_patterns=MERGED_IGNORE_PATTERNS)
    return {"repo_url": str(repo_url), "merged_repo_url": str(merged_repo_url) if merged_repo_url else None}
