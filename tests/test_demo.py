"""`make demo` (README command one), minus serving: train with a SIGKILL and a resume, export, chat, summary."""

import os
import subprocess

from conftest import REPO


def test_make_demo_runs_the_pipeline_offline(tmp_path, tiny_model_dir):
    env = {**os.environ, "DEMO_NO_LAUNCH": "1", "DEMO_OUT": str(tmp_path / "demo"), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(["make", "demo"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "randomly initialised" in out and "meaningless" in out
    assert "killed the training run with SIGKILL after checkpoint-4" in out
    assert "resumed from checkpoint-4" in out and "6 steps" in out
    assert "10/10 checks passed" in out and "assistant: " in out and "tokens/s (llama-cpp-python, q4_k_m)" in out
    assert (tmp_path / "demo" / "gguf" / "Tiny-Llama-3.2-FineTome-Q4_K_M.gguf").is_file()
    assert "serving the Space" not in out  # DEMO_NO_LAUNCH=1
