"""Backend selection, and unsloth staying out of CPU machines."""

import subprocess
import sys

import pytest

from conftest import REPO, run_cli
from train.backends import BACKENDS, compute_dtype, select_backend
from common.cli import UsageError


@pytest.mark.parametrize("requested,cuda,unsloth,expected", [
    ("auto", False, False, "hf"),
    ("auto", False, True, "hf"),
    ("auto", True, False, "hf"),
    ("auto", True, True, "unsloth"),
    ("hf", True, True, "hf"),
    ("unsloth", True, True, "unsloth"),
])
def test_select_backend(requested, cuda, unsloth, expected):
    assert select_backend(requested, has_cuda=cuda, has_unsloth=unsloth) == expected


def test_unsloth_without_cuda_is_a_usage_error():
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        select_backend("unsloth", has_cuda=False, has_unsloth=True)


@pytest.mark.parametrize("cuda,bf16,expected", [(False, False, "fp32"), (True, True, "bf16"), (True, False, "fp16")])
def test_compute_dtype(cuda, bf16, expected):
    assert compute_dtype("auto", has_cuda=cuda, bf16_supported=bf16) == expected


def test_both_backends_are_registered():
    assert set(BACKENDS) == {"hf", "unsloth"}


def test_importing_every_training_module_never_imports_unsloth():
    code = ("import sys, train.config, train.data, train.tiny, train.checkpoints, train.backends, train.trainer, "
            "train.cli; import trl, peft; assert 'unsloth' not in sys.modules, 'unsloth imported'; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA path")
def test_cli_unsloth_backend_without_cuda_exits_2_with_one_line(tiny_model_dir):
    result = run_cli("train/run.py", "--preset", "tiny", "--backend", "unsloth", "--output-dir", "/tmp/never-written")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --backend unsloth: needs a CUDA GPU and none is visible; use --backend hf (or auto) on CPU"]


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(__import__("importlib").util.find_spec("unsloth") is None, reason="needs unsloth")
def test_unsloth_backend_trains_and_saves_a_peft_adapter(tiny_model_dir, tmp_path):
    result = run_cli("train/run.py", "--preset", "tiny", "--backend", "unsloth", "--max-steps", "4",
                     "--save-steps", "2", "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
