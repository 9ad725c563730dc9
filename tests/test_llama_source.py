"""llama-cpp-python's source archive (common/llama_source.py), the one thing an export or a llama.cpp tools build
fetches: kept in the downloads folder after the first fetch, and used only when its sha256 is the one
requirements-dev.lock records, so every later export works offline. And the tools built from it
(common/llama_tools.py): one build for all of them, reused, and a one-line error when no compiler is there."""

from pathlib import Path

import pytest

from common import llama_source
from common.files import sha256_file
from common.llama_runtime import LlamaSetupError
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


# ---------------------------------------------------------------------- llama.cpp's tools (common/llama_tools.py)
def test_the_tools_folder_is_named_by_version_and_machine(tmp_path, monkeypatch):
    from common import llama_tools

    monkeypatch.setenv(llama_tools.TOOLS_ENV, str(tmp_path))
    folder = llama_tools.tools_dir()
    assert folder == tmp_path / f"llama.cpp-tools-{llama_cpp_version()}-{llama_tools.machine_key()}"
    assert llama_tools.machine_key() == llama_tools.machine_key()  # stable on one machine
    assert not llama_tools.tools_are_built()


def test_built_tools_are_reused_without_building(tmp_path, monkeypatch):
    """A complete folder is returned as is: no cmake, no archive (llama-server's path included, space/servers.py)."""
    from common import llama_tools
    from space.servers import build_llama_server, llama_server_binary

    folder = llama_tools.tools_dir(tmp_path)
    folder.mkdir(parents=True)
    for tool in llama_tools.TOOLS:
        (folder / tool).write_text("#!/bin/sh\n")
    monkeypatch.setattr(llama_tools.shutil, "which", lambda name: pytest.fail(f"looked for {name}: a build began"))
    assert llama_tools.llama_tool("llama-imatrix", root=tmp_path) == folder / "llama-imatrix"
    assert build_llama_server(root=tmp_path) == llama_server_binary(tmp_path) == folder / "llama-server"
    with pytest.raises(LlamaSetupError, match="unknown llama.cpp tool 'llama-cli'; choose one of: llama-server"):
        llama_tools.llama_tool("llama-cli", root=tmp_path)


@pytest.mark.parametrize("without, fix", [
    ("", "install them (Debian/Ubuntu: apt-get install cmake g++"),
    ("; or use --engine llama-cpp-python, which needs no compile", "or use --engine llama-cpp-python"),
])
def test_a_missing_compiler_is_one_line_with_the_fix(tmp_path, monkeypatch, without, fix):
    from common import llama_tools

    monkeypatch.setattr(llama_tools.shutil, "which", lambda name: None if name in ("cmake", "c++") else name)
    with pytest.raises(LlamaSetupError) as caught:
        llama_tools.build_llama_tools(root=tmp_path, without=without)
    message = str(caught.value)
    assert message.startswith("building llama.cpp's tools (llama-server, llama-imatrix, llama-quantize, "
                              "llama-perplexity) needs cmake and c++;")
    assert fix in message and "\n" not in message and not any(tmp_path.iterdir())


def test_one_build_holds_every_tool_and_its_record(llama_tools):
    import json
    import subprocess

    from common.llama_tools import TOOLS

    record = json.loads((llama_tools / "build.json").read_text())
    assert record["tools"] == list(TOOLS) and record["llama_cpp_python"] == llama_cpp_version()
    for tool in TOOLS:
        result = subprocess.run([str(llama_tools / tool), "--help"], capture_output=True, text=True, timeout=60)
        assert "usage" in (result.stdout + result.stderr).lower(), tool
        if tool != "llama-quantize":  # decodes nothing; the others share llama.cpp's common arguments
            assert "--no-repack" in result.stdout + result.stderr, tool  # the AMX-safe flag
