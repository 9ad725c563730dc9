"""Sealing, verifying, choosing and rotating checkpoints (pure file operations, no training)."""

import json

import pytest

from train import checkpoints
from train.checkpoints import MANIFEST, REQUIRED_FILES, ResumeError

COMPAT = {"model_name": "m", "lora_r": 16, "lora_alpha": 16, "use_rslora": False, "target_modules": ["q_proj"]}


def fake_checkpoint(root, step, seal=True, compat=COMPAT):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in REQUIRED_FILES + ("rng_state.pth",):
        (folder / name).write_bytes(f"{name}-{step}".encode() * 100)
    if seal:
        checkpoints.seal(folder, {"compat": compat})
    return folder


def test_seal_then_verify(tmp_path):
    folder = fake_checkpoint(tmp_path, 4)
    assert checkpoints.verify(folder) is None
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["step"] == 4 and set(manifest["files"]) == set(REQUIRED_FILES) | {"rng_state.pth"}


@pytest.mark.parametrize("damage,reason", [
    (lambda f: (f / MANIFEST).unlink(), "no manifest"),
    (lambda f: (f / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    (lambda f: (f / "adapter_model.safetensors").write_bytes(b"short"), "adapter_model.safetensors is truncated"),
    (lambda f: (f / "scheduler.pt").write_bytes(b"x" * (f / "scheduler.pt").stat().st_size), "scheduler.pt is corrupt"),
    (lambda f: (f / MANIFEST).write_text("{"), "unreadable manifest"),
])
def test_verify_detects_damage(tmp_path, damage, reason):
    folder = fake_checkpoint(tmp_path, 2)
    damage(folder)
    assert reason in checkpoints.verify(folder)


def test_seal_refuses_a_checkpoint_missing_required_files(tmp_path):
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(RuntimeError, match="lacks adapter_config.json"):
        checkpoints.seal(folder, {})


def test_newest_complete_checkpoint_wins_and_incomplete_ones_are_set_aside(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 12, seal=False)  # numerically newest, but was being written
    warnings = []
    chosen = checkpoints.find_resume_checkpoint(tmp_path, warn=warnings.append)
    assert chosen.name == "checkpoint-10"  # numeric, not lexical, order
    assert warnings == ["warning: skipping incomplete checkpoint checkpoint-12: no manifest (it was still being "
                        "written when the run stopped); moved to incomplete-checkpoint-12"]
    assert (tmp_path / "incomplete-checkpoint-12").is_dir()
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]


def test_nothing_to_resume(tmp_path):
    assert checkpoints.find_resume_checkpoint(tmp_path / "absent") is None
    fake_checkpoint(tmp_path, 3, seal=False)
    assert checkpoints.find_resume_checkpoint(tmp_path, warn=lambda _: None) is None


def test_rotation_keeps_the_newest_sealed_and_never_touches_unsealed(tmp_path):
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 10, seal=False)
    removed = checkpoints.rotate(tmp_path, keep=2)
    assert [p.name for p in removed] == ["checkpoint-2", "checkpoint-4"]
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-8", "checkpoint-10"]


def test_compatibility_check_names_each_difference(tmp_path):
    folder = fake_checkpoint(tmp_path, 2)
    checkpoints.check_compatible(folder, COMPAT)
    with pytest.raises(ResumeError) as caught:
        checkpoints.check_compatible(folder, {**COMPAT, "model_name": "other", "lora_r": 8})
    message = str(caught.value)
    assert "model_name: checkpoint has 'm', this run has 'other'" in message
    assert "lora_r: checkpoint has 16, this run has 8" in message
