"""Shared fixtures: the tiny model is built once per test session into a private cache; what is fetched from the
package index (llama-cpp-python's source archive) is kept in test-artifacts/downloads/ across sessions, so only the
first `make test` on a machine fetches it. A test that needs the package index asks for the `package_index` fixture
(or calls package_index_problem()) and skips, saying why, where it is absent."""

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from common.processes import free_port, wait_until_answers

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "train" / "data" / "finetome_sample.jsonl"
TINY_GGUF_NAME = "Tiny-Llama-3.2-FineTome"
ARTIFACTS = REPO / "test-artifacts"  # screenshots, built tools, downloads kept across sessions (git-ignored)
# The llama-cpp-python source archive every export and the llama-server build take llama.cpp from
# (common/llama_source.py), kept here unless FINETOME_DOWNLOADS names another folder.
os.environ.setdefault("FINETOME_DOWNLOADS", str(ARTIFACTS / "downloads"))
# llama.cpp's tools (llama-server, llama-imatrix, llama-quantize, llama-perplexity: common/llama_tools.py), built by
# one CMake build on first use and kept here for every later session, unless FINETOME_LLAMA_TOOLS names another folder.
os.environ.setdefault("FINETOME_LLAMA_TOOLS", str(ARTIFACTS))


@functools.cache
def package_index_problem() -> str | None:
    """Why pip's package index cannot be reached from here (one line), or None when it answers."""
    index = os.environ.get("PIP_INDEX_URL")
    if not index:
        configured = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                                    capture_output=True, text=True)
        index = configured.stdout.strip() if configured.returncode == 0 else None
    if not index:
        from pip._internal.models.index import PyPI  # pip's own default index, as pip itself would ask it

        index = PyPI.simple_url
    try:
        urllib.request.urlopen(index.rstrip("/") + "/pip/", timeout=10).close()
    except OSError as error:
        return f"the package index {index} is not reachable ({getattr(error, 'reason', error)})"
    return None


@pytest.fixture(scope="session")
def package_index() -> None:
    """For tests that ask pip's package index (PyPI or the configured mirror): skipped, saying why, without it."""
    if problem := package_index_problem():
        pytest.skip(f"needs the package index: {problem}")


@functools.cache
def find_python312() -> str | None:
    """A working Python 3.12 (Colab's): INSTALL_TEST_PYTHON, `python3.12` on PATH, or pyenv's newest 3.12."""
    candidates = [os.environ.get("INSTALL_TEST_PYTHON"), shutil.which("python3.12")]
    pyenv = shutil.which("pyenv")
    if pyenv:
        root = subprocess.run([pyenv, "root"], check=False, capture_output=True, text=True).stdout.strip()
        versions = sorted(Path(root, "versions").glob("3.12*"),
                          key=lambda p: [int(n) for n in re.findall(r"\d+", p.name)])
        candidates += [str(version / "bin" / "python3.12") for version in reversed(versions)]
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
                               check=False, capture_output=True, text=True)  # an inactive pyenv shim fails
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            return candidate
    return None


@pytest.fixture(scope="session")
def llama_source_archive() -> Path:
    """llama-cpp-python's source archive, kept (test-artifacts/downloads/) or fetched now; the tests that convert or
    build llama.cpp skip, saying why, when it is neither kept nor fetchable."""
    from common.llama_runtime import LlamaSetupError
    from common.llama_source import source_archive

    try:
        return source_archive(log=lambda *_: None)
    except LlamaSetupError:
        if problem := package_index_problem():
            pytest.skip(f"needs llama-cpp-python's source archive, not yet kept in "
                        f"{os.environ['FINETOME_DOWNLOADS']}, and {problem}")
        raise


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """FINETOME_CACHE for this session (and the subprocesses it starts)."""
    path = Path(os.environ.get("FINETOME_TEST_CACHE") or tmp_path_factory.mktemp("finetome-cache"))
    os.environ["FINETOME_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(cache_dir):
    from train.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def run_cli(script: str, *args: str, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    """Run an entry script the way a user does, from the repo root, and capture its output."""
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"}, **popen)


def sigkill_when(script: str, *args: str, reached: Callable[[], object], what: str, timeout: float = 300) -> None:
    """Start an entry script the way a user does and SIGKILL it the moment `reached()` is true (a runtime that dies
    mid-step: Colab's disconnect, the OOM killer); fails if it ends first or `what` is not reached in time."""
    process = subprocess.Popen([sys.executable, str(REPO / script), *args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not reached():
        assert process.poll() is None, f"{script} ended before {what}: {process.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"{script} did not reach {what} within {timeout:.0f} s"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()


def processes_running(*fragments: str) -> list[int]:
    """The processes whose command line holds every fragment (e.g. a tool's name and the folder it writes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if all(fragment in command for fragment in fragments):
                found.append(int(entry.name))
    return found


def processes_left(*fragments: str, seconds: float = 10) -> list[int]:
    """processes_running(*fragments) once they are gone, or after `seconds`: what a killed parent left behind."""
    deadline = time.time() + seconds
    while (found := processes_running(*fragments)) and time.time() < deadline:
        time.sleep(0.05)
    return found


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory, tiny_model_dir):
    """A short real training run of the tiny preset (its adapter is what users export)."""
    out = tmp_path_factory.mktemp("train") / "run"
    result = run_cli("train/run.py", "--preset", "tiny", "--output-dir", str(out), "--max-steps", "2",
                     "--save-steps", "2", "--eval-samples", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "adapter"


@pytest.fixture(scope="session")
def exported(trained_adapter, llama_source_archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny"
    result = run_cli("export/to_gguf.py", "--adapter", str(trained_adapter), "--out", str(out),
                     "--quant", "q4_k_m", "q8_0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


@pytest.fixture(scope="session")
def llama_tools(llama_source_archive) -> Path:
    """The folder of llama.cpp's built tools (one CMake build, kept in test-artifacts/ across sessions); the tests
    that need them skip, saying why, where cmake or a C++ compiler is missing."""
    from common.llama_runtime import LlamaSetupError
    from common.llama_tools import build_llama_tools

    try:
        return build_llama_tools(log=lambda *_: None)
    except LlamaSetupError as error:
        if "needs" in str(error):
            pytest.skip(str(error))
        raise


@pytest.fixture(scope="session")
def exported_imatrix(trained_adapter, llama_tools, tmp_path_factory):
    """The tiny model's q4_k_m and q8_0 export with --imatrix: the matrix calibrated on its own training data."""
    out = tmp_path_factory.mktemp("export-imatrix") / "tiny"
    result = run_cli("export/to_gguf.py", "--adapter", str(trained_adapter), "--out", str(out),
                     "--quant", "q4_k_m", "q8_0", "--imatrix", "--imatrix-tokens", "4096")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


@pytest.fixture(scope="session")
def tiny_gguf(exported) -> Path:
    """The tiny model's verified q4_k_m GGUF (what the Space serves in tests)."""
    return exported[0] / f"{TINY_GGUF_NAME}-Q4_K_M.gguf"


@pytest.fixture(scope="session")
def server(tiny_gguf, tmp_path_factory):
    """`python space/app.py --model A --model B` as a user starts it; yields (url, vote log path)."""
    folder = tmp_path_factory.mktemp("space")
    # The same GGUF under two names: two catalog entries, two Llama instances, two locks.
    first, second = folder / "Tiny-A-Q4_K_M.gguf", folder / "Tiny-B-Q4_K_M.gguf"
    os.symlink(tiny_gguf, first)
    os.symlink(tiny_gguf, second)
    votes = folder / "votes" / "votes.jsonl"
    port = free_port()
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "space/app.py"), "--model", str(first), "--model", str(second),
         "--host", "127.0.0.1", "--port", str(port), "--votes", str(votes), "--n-ctx", "1024",
         "--stream-interval", "0"],  # every token streamed: the tests count updates; the tiny model is fast
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    wait_until_answers(url, process, timeout=120, log=folder / "server.log")
    yield url, votes
    process.terminate()
    process.wait(timeout=30)


# The fast lane (`pytest -m "not slow"`: `make check`, and the tests `make upgrade-check` runs against the newest
# versions the requirements allow) leaves out the end-to-end runs that take minutes each on 2 cores (--durations,
# 2026-12-06: the demo 373 s, the build of llama.cpp's tools 527 s on first use, the notebook 162 s, the export's
# kill-and-redo runs 40-130 s, the Colab install dry run 36 s, the Hugging Face-style Space build 11 min on first use;
# the importance-matrix export and its kill-and-rerun about 15 min together under load). It still
# trains, exports and chats with the tiny model (engine, OpenAI client against a real server, the Space over HTTP).
SLOW_MODULES = {"test_demo.py", "test_notebook.py", "test_export.py", "test_train_resume.py", "test_space_browser.py",
                "test_dpo.py"}
SLOW_FIXTURES = {"dry_runs", "llama_server", "llama_tools"}
NETWORK_FIXTURES = {"package_index", "dry_runs"}  # `-m network` selects them (pytest.ini); each skips without it
SLOW_TESTS = {
    "tests/test_deploy.py::test_the_uploaded_tree_installs_and_chats_as_hugging_face_builds_it",
    "tests/test_remote.py::test_a_browser_chats_with_the_server_model",
    "tests/test_compare.py::test_compare_q4_k_m_with_q8_0",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if NETWORK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.network)
        if (item.path.name in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
                or item.nodeid.split("[")[0] in SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
