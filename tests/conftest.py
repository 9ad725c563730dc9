"""Shared fixtures: the tiny model is built once per test session into a private cache."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "train" / "data" / "finetome_sample.jsonl"
TINY_GGUF_NAME = "Tiny-Llama-3.2-FineTome"
ARTIFACTS = REPO / "test-artifacts"  # screenshots from the browser test (git-ignored)


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


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory, tiny_model_dir):
    """A short real training run of the tiny preset (its adapter is what users export)."""
    out = tmp_path_factory.mktemp("train") / "run"
    result = run_cli("train/run.py", "--preset", "tiny", "--output-dir", str(out), "--max-steps", "2",
                     "--save-steps", "2", "--eval-samples", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "adapter"


@pytest.fixture(scope="session")
def exported(trained_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny"
    result = run_cli("export/to_gguf.py", "--adapter", str(trained_adapter), "--out", str(out),
                     "--quant", "q4_k_m", "q8_0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


@pytest.fixture(scope="session")
def tiny_gguf(exported) -> Path:
    """The tiny model's verified q4_k_m GGUF (what the Space serves in tests)."""
    return exported[0] / f"{TINY_GGUF_NAME}-Q4_K_M.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            assert process.poll() is None, (folder / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "the Space did not start within 2 minutes"
            time.sleep(0.5)
    yield url, votes
    process.terminate()
    process.wait(timeout=30)
