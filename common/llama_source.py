"""The llama.cpp source of the installed llama-cpp-python: its PyPI source archive holds `vendor/llama.cpp/`, the
very release the runtime was compiled from. The export takes llama.cpp's converter from it; scripts/serve_openai.py
builds llama.cpp's own server (llama-server) from it. Fetched with pip (so a pip mirror or proxy works as for
installing) once per machine: the archive is kept in the downloads folder ($FINETOME_DOWNLOADS, default
<cache folder>/downloads) and checked against the sha256 requirements-dev.lock records for that version, so only
the first export ever goes online.

    from common.llama_source import source_archive
    archive = source_archive()   # ~/.cache/finetome-pipeline/downloads/llama_cpp_python-0.3.36.tar.gz
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from common.files import sha256_file
from common.llama_runtime import LlamaSetupError
from common.llama3 import cache_root
from common.locks import REPO, blocks, read_pins

__all__ = ["llama_cpp_version", "downloads_dir", "locked_sha256", "source_archive", "download_source_archive",
           "extract_vendored"]

DOWNLOADS_ENV = "FINETOME_DOWNLOADS"
HASHED_LOCK = REPO / "requirements-dev.lock"  # the lock that records the source archive's sha256 (PyPI has no wheel)


def llama_cpp_version() -> str:
    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        raise LlamaSetupError("llama-cpp-python is not installed: after training, `python scripts/install_train.py` "
                              "installs the export's packages; in a checkout for the tests, `make venv`") from None


def downloads_dir() -> Path:
    """Where fetched archives are kept for good: $FINETOME_DOWNLOADS, default <cache folder>/downloads."""
    return Path(os.environ.get(DOWNLOADS_ENV) or cache_root() / "downloads")


def locked_sha256(version: str, lock_text: str) -> list[str]:
    r"""The sha256 hashes a hashed lock records for llama-cpp-python==`version` ([] when it pins another version).

    >>> lock = "llama-cpp-python==0.3.36 \\\n    --hash=sha256:83ab\n    # via x\nnumpy==2.0 \\\n    --hash=sha256:ff\n"
    >>> locked_sha256("0.3.36", lock), locked_sha256("0.3.37", lock)
    (['83ab'], [])
    """
    return [digest for name, lines in blocks(lock_text)
            if name == "llama-cpp-python" and read_pins(lines[0]).get(name) == version
            for digest in re.findall(r"--hash=sha256:([0-9a-f]+)", "\n".join(lines))]


def source_archive(log=print) -> Path:
    """The installed llama-cpp-python's source archive from the downloads folder, fetched with pip the first time.

    A kept archive is used only if its sha256 is one requirements-dev.lock records for the installed version (a
    version the lock does not pin is taken as pip fetched it); a fetched one that does not match is refused."""
    version = llama_cpp_version()
    folder = downloads_dir()
    kept = folder / f"llama_cpp_python-{version}.tar.gz"
    expected = locked_sha256(version, HASHED_LOCK.read_text(encoding="utf-8")) if HASHED_LOCK.is_file() else []
    if kept.is_file() and (not expected or sha256_file(kept) in expected):
        return kept
    folder.mkdir(parents=True, exist_ok=True)
    log(f"fetching llama-cpp-python {version}'s source archive with pip (once per machine) into {folder}")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as scratch:
        archive = download_source_archive(Path(scratch))
        if expected and (digest := sha256_file(archive)) not in expected:
            raise LlamaSetupError(f"llama-cpp-python=={version}'s source archive from the package index has sha256 "
                                  f"{digest}, not the {expected[0]} that {HASHED_LOCK.name} records; check the index "
                                  "or mirror pip uses (pip config list)")
        archive.replace(kept)  # complete or absent, never half-written under the kept name
    return kept


def download_source_archive(folder: Path) -> Path:
    """llama-cpp-python's source archive (the installed version) downloaded into `folder`; one-line error if not."""
    version = llama_cpp_version()
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               "--dest", str(folder), f"llama-cpp-python=={version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = list(Path(folder).glob("llama_cpp_python-*.tar.gz"))
    if result.returncode != 0 or not archives:
        last = (result.stderr.strip().splitlines() or ["no archive downloaded"])[-1]
        raise LlamaSetupError(f"could not download llama-cpp-python=={version}'s source archive ({last}); "
                              "check the network")
    return archives[0]


def extract_vendored(archive: Path, destination: Path, pattern: str = ".*") -> int:
    """The files of `vendor/llama.cpp/` whose path there matches `pattern`, extracted under `destination` with that
    path; returns how many."""
    wanted = re.compile(rf"^[^/]+/vendor/llama\.cpp/({pattern})$")
    destination.mkdir(parents=True, exist_ok=True)
    count = 0
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            match = wanted.match(member.name)
            if not match or not (member.isfile() or member.isdir()):
                continue
            member.name = match.group(1)
            tar.extract(member, destination, filter="data")
            count += member.isfile()
    return count
