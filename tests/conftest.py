"""Shared fixtures: the tiny model is built once per test session into a private cache."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "train" / "data" / "finetome_sample.jsonl"


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
