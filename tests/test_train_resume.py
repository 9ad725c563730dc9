"""End-to-end training through the real CLI: outputs, exact resume after SIGKILL, corrupt checkpoints.

Each run trains the tiny Llama-3.2-architecture model for real on CPU (a few seconds per step).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, sigkill_when

ARGS = ["--preset", "tiny", "--max-steps", "6", "--save-steps", "2", "--eval-samples", "4"]


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def logged_losses(folder: Path) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in json.loads((folder / "run.json").read_text())["losses"]}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_dir):
    """One uninterrupted 6-step run, shared by the tests below."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run_cli("train/run.py", *ARGS, "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_tiny_run_writes_adapter_run_json_and_loss_curve(reference_run, tiny_model_dir):
    out, result = reference_run
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert (adapter / "tokenizer.json").is_file() and (adapter / "chat_template.jinja").is_file()

    weights = adapter_weights(adapter)
    # LoRA B starts at zero: after real optimizer steps it no longer is.
    b_norm = sum(v.abs().sum().item() for k, v in weights.items() if "lora_B" in k)
    assert b_norm > 0
    assert len(weights) == 4 * 7 * 2  # 4 layers x 7 projections x (A, B)

    summary = json.loads((out / "run.json").read_text())
    assert summary["steps"] == 6 and summary["backend"] == "hf" and summary["device"] == "cpu"
    assert summary["dtype"] == "fp32"
    assert [entry["step"] for entry in summary["losses"]] == [1, 2, 3, 4, 5, 6]
    assert [entry["step"] for entry in summary["eval_losses"]] == [2, 4, 6]
    assert summary["tokens_seen"] > 1000 and summary["tokens_per_second"] > 0
    assert summary["peak_rss_mb"] > 0 and summary["wall_seconds"] > 0
    assert summary["config"]["max_steps"] == 6 and summary["versions"]["trl"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Checkpoints are sealed and rotated to --save-total-limit (3 for the tiny preset).
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert all((p / "checkpoint_manifest.json").is_file() for p in out.glob("checkpoint-*"))
    assert "train:" in result.stdout and "tok/s" in result.stdout


def test_adapter_loads_with_peft_on_the_base_model(reference_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = reference_run
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    before = base(ids).logits
    model = PeftModel.from_pretrained(base, out / "adapter")
    after = model(ids).logits
    assert (after - before).abs().max().item() > 0  # the trained adapter changes the model's output


def test_sigkill_after_checkpoint_then_resume_is_exact(reference_run, tmp_path):
    reference, _ = reference_run
    out = tmp_path / "run"
    sealed = out / "checkpoint-4" / "checkpoint_manifest.json"
    sigkill_when("train/run.py", *ARGS, "--output-dir", str(out), reached=sealed.exists, what="checkpoint-4")
    assert not (out / "adapter").exists() and not (out / "checkpoint-6").exists()

    resumed = run_cli("train/run.py", *ARGS, "--output-dir", str(out), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: continuing from" in resumed.stdout and "checkpoint-4" in resumed.stdout
    assert f"data: reusing what was prepared in {out / 'data'}" in resumed.stdout  # nothing read or tokenized again
    assert "data: tokenized" not in resumed.stdout
    assert max_difference(adapter_weights(out / "adapter"), adapter_weights(reference / "adapter")) <= 1e-6
    expected, got = logged_losses(reference), logged_losses(out)
    for step in (5, 6):
        assert got[step] == pytest.approx(expected[step], abs=1e-6)


def test_truncated_newest_checkpoint_falls_back_to_previous(reference_run, tmp_path):
    reference, _ = reference_run
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "adapter")
    weights = out / "checkpoint-6" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    resumed = run_cli("train/run.py", *ARGS, "--output-dir", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping incomplete checkpoint checkpoint-6" in resumed.stdout
    assert "adapter_model.safetensors is truncated" in resumed.stdout
    assert "continuing from" in resumed.stdout and "checkpoint-4" in resumed.stdout
    assert (out / "incomplete-checkpoint-6").is_dir()  # set aside, not deleted
    # Steps 5-6 were redone from checkpoint-4: the result is the uninterrupted run's.
    assert max_difference(adapter_weights(out / "adapter"), adapter_weights(reference / "adapter")) <= 1e-6


def test_resume_with_another_lora_shape_is_refused(reference_run, tmp_path):
    reference, _ = reference_run
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    result = run_cli("train/run.py", *ARGS, "--output-dir", str(out), "--lora-r", "8")
    assert result.returncode == 2
    assert "different model or LoRA shape" in result.stderr and "lora_r: checkpoint has 16, this run has 8" in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_never_refuses_existing_checkpoints_unless_overwrite(reference_run, tmp_path):
    reference, _ = reference_run
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    result = run_cli("train/run.py", *ARGS, "--output-dir", str(out), "--resume", "never")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "already holds checkpoint-2, checkpoint-4, checkpoint-6" in result.stderr
    assert "Traceback" not in result.stderr


def _snapshot(folder: Path) -> dict[str, int]:
    """Every file under the run folder with its modification time: what a rerun must leave alone."""
    return {path.relative_to(folder).as_posix(): path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


def test_rerunning_a_finished_run_changes_nothing(reference_run, tmp_path):
    """The README tells Colab users to rerun every cell after a disconnect: a finished run must stay finished."""
    reference, _ = reference_run
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = _snapshot(out)
    result = run_cli("train/run.py", *ARGS, "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"done: the run in {out} is complete (6 steps, --max-steps 6); adapter: " in result.stdout
    assert "raise --max-steps to train further" in result.stdout and "train:" not in result.stdout
    assert _snapshot(out) == before  # no checkpoint, adapter, run.json or loss.png touched


def test_a_finished_constant_schedule_run_keeps_its_adapter_and_more_steps_continue_it(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    args = ["--preset", "tiny", "--max-steps", "2", "--save-steps", "2", "--eval-samples", "0",
            "--lr-scheduler", "constant", "--output-dir", str(out)]
    first = run_cli("train/run.py", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    weights = adapter_weights(out / "adapter")
    again = run_cli("train/run.py", *args)
    assert again.returncode == 0 and "is complete (2 steps" in again.stdout
    assert max_difference(adapter_weights(out / "adapter"), weights) == 0.0

    more = run_cli("train/run.py", *args[:2], "--max-steps", "3", *args[4:])
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resume: the finished 2-step run continues to 3 steps; the constant learning rate is unchanged" in more.stdout
    assert json.loads((out / "run.json").read_text())["steps"] == 3
    assert max_difference(adapter_weights(out / "adapter"), weights) > 0  # the extra step trained
