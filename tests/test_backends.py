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


@pytest.mark.parametrize("capability, expected", [
    (None, "fp32"),  # CPU
    ((7, 5), "fp16"),  # T4 (Colab): torch.cuda.is_bf16_supported() says True there, emulated
    ((7, 0), "fp16"),  # V100
    ((8, 0), "bf16"),  # A100
    ((8, 6), "bf16"),  # A10G, RTX 30xx
    ((8, 9), "bf16"),  # L4, RTX 40xx
    ((9, 0), "bf16"),  # H100
])
def test_compute_dtype_follows_the_compute_capability(capability, expected):
    assert compute_dtype("auto", capability=capability) == expected


def test_bf16_asked_of_a_t4_is_a_usage_error_and_explicit_choices_stand():
    with pytest.raises(UsageError, match=r"--dtype bf16: this GPU \(compute capability 7.5\) has no bf16"):
        compute_dtype("bf16", capability=(7, 5))
    assert compute_dtype("fp16", capability=(9, 0)) == "fp16" and compute_dtype("fp32", capability=(7, 5)) == "fp32"


def test_a_gpu_torch_cannot_use_is_never_a_silent_fall_back_to_the_cpu():
    with pytest.raises(UsageError) as caught:
        select_backend("auto", has_cuda=False, has_unsloth=True, gpu_unusable=True)
    (problem,) = caught.value.problems
    assert problem.startswith("--backend auto: this machine has an NVIDIA GPU (nvidia-smi) but torch ")
    assert "cannot use it" in problem and "--backend hf to train on the CPU on purpose" in problem
    # Asked for explicitly, the CPU is a choice; and with no GPU there is nothing to warn about.
    assert select_backend("hf", has_cuda=False, has_unsloth=True, gpu_unusable=True) == "hf"
    assert select_backend("auto", has_cuda=False, has_unsloth=True, gpu_unusable=False) == "hf"


def test_a_failing_unsloth_import_is_one_line(monkeypatch, tiny_model_dir):
    from train.config import load_preset, TrainConfig

    monkeypatch.setitem(sys.modules, "unsloth", None)  # `import unsloth` now raises ImportError, as a broken install does
    config = TrainConfig(**load_preset("tiny"))
    with pytest.raises(UsageError) as caught:
        BACKENDS["unsloth"].load(config, str(tiny_model_dir))
    (problem,) = caught.value.problems
    assert problem.startswith("--backend unsloth: importing unsloth failed (ModuleNotFoundError: import of unsloth")
    assert "\n" not in problem and "use --backend hf" in problem


def test_both_backends_are_registered():
    assert set(BACKENDS) == {"hf", "unsloth"}


def test_importing_every_training_module_never_imports_unsloth():
    code = ("import sys, train.config, train.conversations, train.tiny, train.checkpoints, train.backends, train.trainer, "
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
