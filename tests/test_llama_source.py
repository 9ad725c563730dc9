"""llama-cpp-python's source archive (common/llama_source.py), the one thing an export or a llama-server build fetches:
kept in the downloads folder after the first fetch, and used only when its sha256 is the one requirements-dev.lock
records, so every later export works offline."""

from pathlib import Path

import pytest

from common import llama_source
from common.files import sha256_file
from common.llama import LlamaSetupError
from common.llama_source import HASHED_LOCK, locked_sha256, llama_cpp_version, source_archive

# pip pointed at a closed port, asked once, quickly: any attempt to go online fails at once.
OFFLINE = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2",
           "PIP_FIND_LINKS": "", "PIP_NO_INPUT": "1"}


def offline(monkeypatch, downloads: Path | None = None) -> None:
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    if downloads is not None:
        monkeypatch.setenv(llama_source.DOWNLOADS_ENV, str(downloads))


def test_the_lock_records_the_installed_versions_archive():
    assert len(locked_sha256(llama_cpp_version(), HASHED_LOCK.read_text())) == 1


def test_the_kept_archive_matches_the_lock_and_is_used_offline(llama_source_archive, monkeypatch):
    assert llama_source_archive.name == f"llama_cpp_python-{llama_cpp_version()}.tar.gz"
    assert sha256_file(llama_source_archive) in locked_sha256(llama_cpp_version(), HASHED_LOCK.read_text())
    offline(monkeypatch)
    assert source_archive(log=lambda line: pytest.fail(f"went online: {line}")) == llama_source_archive


def test_a_kept_archive_that_is_not_the_locked_one_is_fetched_again(tmp_path, monkeypatch):
    kept = tmp_path / f"llama_cpp_python-{llama_cpp_version()}.tar.gz"
    kept.write_bytes(b"a truncated or tampered archive")
    offline(monkeypatch, tmp_path)
    fetched = []
    with pytest.raises(LlamaSetupError, match="could not download llama-cpp-python==.*check the network"):
        source_archive(log=fetched.append)
    assert fetched and "once per machine" in fetched[0]
    assert kept.read_bytes() == b"a truncated or tampered archive"  # nothing new was kept


def test_a_fetched_archive_that_is_not_the_locked_one_is_refused(tmp_path, monkeypatch):
    """What a mirror serving another file would hand pip (the fetch itself replaced: the network is not the test)."""
    def mirror(folder: Path) -> Path:
        served = folder / f"llama_cpp_python-{llama_cpp_version()}.tar.gz"
        served.write_bytes(b"someone else's archive")
        return served

    monkeypatch.setenv(llama_source.DOWNLOADS_ENV, str(tmp_path))
    monkeypatch.setattr(llama_source, "download_source_archive", mirror)
    with pytest.raises(LlamaSetupError, match=r"has sha256 [0-9a-f]{64}, not the [0-9a-f]{64} that "
                                              r"requirements-dev.lock records; check the index"):
        source_archive(log=lambda *_: None)
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # the scratch folder is gone, nothing kept
