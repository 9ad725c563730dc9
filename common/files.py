"""Atomic files: everything is written under a hidden temporary name beside its final name and renamed when
complete, so a crash or SIGKILL never leaves a truncated file (or folder) under a final name."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


def temporary_path(final: Path, kind: str = "tmp") -> Path:
    """`.<name>.<kind>-<pid>` in the same folder, so the final rename is atomic.

    >>> temporary_path(Path("out/model.gguf")).name.startswith(".model.gguf.tmp-")
    True
    """
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}")


def write_text_atomic(path: Path, text: str) -> None:
    """`text` under `path`, complete or not at all."""
    temporary = temporary_path(path)
    temporary.write_text(text)
    os.replace(temporary, path)


def write_json_atomic(path: Path, data) -> None:
    """`data` as indented JSON under `path`, complete or not at all (values JSON cannot hold become strings)."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def swap_in_folder(staging: Path, target: Path) -> None:
    """Rename the finished folder `staging` to `target`; an existing target is moved aside first and deleted after,
    and put back if the rename fails."""
    previous = temporary_path(target, "old")
    if target.exists():
        os.replace(target, previous)
    try:
        os.replace(staging, target)
    except OSError:
        if previous.exists():
            os.replace(previous, target)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def sha256_file(path: Path) -> str:
    """The file's SHA-256, hex, read in blocks (models are GBs)."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def remove_stale_temporaries(folder: Path, prefix: str = ".") -> list[Path]:
    """Delete the temporary files and folders (`.<name>.tmp-<pid>`, `.<name>.old-<pid>`) that killed runs left
    in `folder`, unless the process that made one is still running. Each can be a whole model."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if not path.name.startswith(prefix):
            continue
        stem, _, pid = path.name.rpartition("-")
        if not (stem.endswith((".tmp", ".old")) and pid.isdigit()):
            continue
        if int(pid) != os.getpid() and process_exists(int(pid)):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def output_folder_problem(folder: Path) -> str | None:
    """Why `folder` cannot be an output folder (it exists and is not a folder; a path above it is a file; the
    nearest existing folder above it cannot be written), or None when it can.

    >>> output_folder_problem(Path("/")) is None
    True
    >>> output_folder_problem(Path("/dev/null"))
    'exists and is not a folder'
    >>> output_folder_problem(Path("/dev/null/out"))
    '/dev/null is a file, not a folder'
    """
    folder = Path(folder).expanduser()
    if folder.exists():
        if not folder.is_dir():
            return "exists and is not a folder"
        existing = folder
    else:
        existing = next((parent for parent in folder.parents if parent.exists()), None)
        if existing is None:
            return None
        if not existing.is_dir():
            return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} cannot be written by this user"
    return None
