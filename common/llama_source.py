"""The llama.cpp source of the installed llama-cpp-python: its PyPI source archive holds `vendor/llama.cpp/`, the
very release the runtime was compiled from. The export takes llama.cpp's converter from it; scripts/serve_openai.py
builds llama.cpp's own server (llama-server) from it. Fetched with pip, so a pip mirror or proxy works as for
installing.

    from common.llama_source import download_source_archive, llama_cpp_version
    archive = download_source_archive(Path("scratch"))   # scratch/llama_cpp_python-0.3.36.tar.gz
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

from common.llama import LlamaSetupError

__all__ = ["llama_cpp_version", "download_source_archive", "extract_vendored"]


def llama_cpp_version() -> str:
    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        raise LlamaSetupError("llama-cpp-python is not installed; pip install -r requirements-dev.txt") from None


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
