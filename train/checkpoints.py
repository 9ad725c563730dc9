"""Checkpoints that survive a dead runtime: a manifest marks each one complete, resume picks the newest
complete one, and rotation never deletes the last good checkpoint before a newer one is sealed.

Hugging Face's Trainer writes `checkpoint-N/` file by file and its own resume takes the highest N even
when the process died half-way through writing it. Here, after the Trainer has written everything,
`seal()` adds `checkpoint_manifest.json` listing every file with its size and SHA-256 (written under a
temporary name and renamed, so the manifest itself is all-or-nothing). `verify()` re-checks sizes and
hashes, so a truncated weight file, a missing optimizer state or an unsealed folder all count as
incomplete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from common.files import sha256_file

MANIFEST = "checkpoint_manifest.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# What a resumable checkpoint must contain, whatever else the Trainer writes.
REQUIRED_FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                  "trainer_state.json")


class ResumeError(RuntimeError):
    """Resuming is impossible or unsafe; the message says what to do."""


def step_of(path: Path) -> int | None:
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def _fsync(path: Path) -> None:
    # Drive and other network mounts may keep data in the page cache; make it durable before sealing.
    try:
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    except OSError:
        pass


def seal(checkpoint: Path, info: dict) -> None:
    """Mark a fully written checkpoint complete (call after the Trainer has written every file)."""
    checkpoint = Path(checkpoint)
    files = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST):
        _fsync(path)
        files[path.relative_to(checkpoint).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise RuntimeError(f"checkpoint {checkpoint} lacks {', '.join(missing)}; not sealing it")
    manifest = {"step": step_of(checkpoint), "sealed_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files, **info}
    temporary = checkpoint / (MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=1))
    _fsync(temporary)
    os.replace(temporary, checkpoint / MANIFEST)


def verify(checkpoint: Path) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it is not."""
    checkpoint = Path(checkpoint)
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest (it was still being written when the run stopped)"
    except (OSError, json.JSONDecodeError):
        return "unreadable manifest"
    for name, expected in manifest.get("files", {}).items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} is truncated or changed ({path.stat().st_size} bytes, expected {expected['size']})"
        if sha256_file(path) != expected["sha256"]:
            return f"{name} is corrupt (checksum mismatch)"
    return None


def read_manifest(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / MANIFEST).read_text())


def set_aside(checkpoint: Path) -> Path:
    """Rename an incomplete checkpoint out of the way (never delete: it might matter to someone).

    The new name does not start with `checkpoint-`, so neither the Trainer nor we see it again.
    """
    checkpoint = Path(checkpoint)
    target = checkpoint.with_name(f"incomplete-{checkpoint.name}")
    suffix = 1
    while target.exists():
        suffix += 1
        target = checkpoint.with_name(f"incomplete-{checkpoint.name}-{suffix}")
    checkpoint.rename(target)
    return target


def find_resume_checkpoint(output_dir: Path, warn=print) -> Path | None:
    """The newest complete checkpoint; newer incomplete ones are set aside with a warning naming them."""
    for checkpoint in reversed(list_checkpoints(output_dir)):
        reason = verify(checkpoint)
        if reason is None:
            return checkpoint
        moved = set_aside(checkpoint)
        warn(f"warning: skipping incomplete checkpoint {checkpoint.name}: {reason}; moved to {moved.name}")
    return None


def check_compatible(checkpoint: Path, expected: dict) -> None:
    """Refuse a checkpoint trained with another base model or LoRA shape.

    `expected` holds the same keys that `seal()` was given under "compat".
    """
    try:
        stored = read_manifest(checkpoint).get("compat", {})
    except (OSError, json.JSONDecodeError) as e:
        raise ResumeError(f"cannot read {checkpoint}/{MANIFEST}: {e}") from e
    differences = [f"{key}: checkpoint has {stored.get(key)!r}, this run has {value!r}"
                   for key, value in expected.items() if stored.get(key) != value]
    if differences:
        raise ResumeError(
            f"checkpoint {checkpoint} was made with a different model or LoRA shape ("
            + "; ".join(differences)
            + "). Use another --output-dir, or --resume never --overwrite to start over."
        )


def rotate(output_dir: Path, keep: int) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep`; incomplete ones are left alone."""
    if keep <= 0:
        return []
    complete = [c for c in list_checkpoints(output_dir) if (c / MANIFEST).is_file()]
    doomed = complete[:-keep]
    for checkpoint in doomed:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return doomed
