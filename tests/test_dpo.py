"""DPO end to end through the real CLI, on the Space's own votes: pairs from a vote log written by space/votes.py, a run
that learns (held-out preference accuracy rises, from a real run), exact resume after SIGKILL, a half-written
checkpoint set aside, a finished run left alone, and an export of the DPO adapter that passes verification.

The tiny model trains for real on CPU (a few seconds per step)."""

import json
import shutil

import pytest

from conftest import run_cli, sigkill_when
from test_preferences import write_vote_log
from test_train_resume import _snapshot, adapter_weights, max_difference

STEPS = ["--max-steps", "6", "--save-steps", "2"]
SETTINGS = ["--batch-size", "4", "--grad-accum", "1", "--eval-samples", "0", "--heldout-pairs", "12",
            "--learning-rate", "2e-4", "--lr-scheduler", "constant", "--warmup-steps", "0"]


@pytest.fixture(scope="module")
def votes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("space") / "votes"
    return folder, write_vote_log(folder)


@pytest.fixture(scope="module")
def dpo_args(votes, trained_adapter):
    return ["--preset", "tiny-dpo", "--sft-adapter", str(trained_adapter), "--pairs", str(votes[0]), *STEPS,
            *SETTINGS]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, dpo_args):
    """One uninterrupted 6-step DPO run on the vote-log pairs, shared by the tests below."""
    out = tmp_path_factory.mktemp("dpo") / "run"
    result = run_cli("train/run.py", *dpo_args, "--output-dir", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def losses(folder):
    return {entry["step"]: entry["loss"] for entry in json.loads((folder / "run.json").read_text())["losses"]}


def test_the_votes_become_pairs_and_dpo_raises_held_out_preference_accuracy(reference_run, votes, trained_adapter):
    out, result = reference_run
    written = votes[1]
    summary = json.loads((out / "run.json").read_text())
    counts = summary["pairs"]["counts"]
    assert (counts["pairs"], counts["ties"], counts["both_bad"], counts["duplicates"]) == (
        written["pairs"], written["ties"], written["both_bad"], written["duplicates"])
    assert summary["pairs"]["split"] == {"heldout": 12, "eval": 0, "train": written["pairs"] - 12}
    assert f"{written['ties']} ties and {written['both_bad']} 'both bad' skipped" in result.stdout

    heldout = summary["heldout"]
    before, after = heldout["before"], heldout["after"]
    assert heldout["pairs"] == 12
    assert after["preference_accuracy"] > before["preference_accuracy"]  # measured in this run, before and after
    assert after["reward_margin"] > 0 and after["reward_accuracy"] > 0.5
    assert "held-out pairs (12): preference accuracy" in result.stdout

    assert summary["stage"] == "dpo" and summary["steps"] == 6 and summary["device"] == "cpu"
    assert summary["sft"]["adapter"] == str(trained_adapter)
    assert [entry["step"] for entry in summary["rewards"]] == [1, 2, 3, 4, 5, 6]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    # One plain LoRA adapter carrying SFT and DPO: the policy started as the SFT adapter and moved from it.
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    sft_config = json.loads((trained_adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == sft_config["base_model_name_or_path"] and config["r"] == sft_config["r"]
    assert not (out / "adapter" / "ref").exists() and not (out / "checkpoint-6" / "ref").exists()
    assert 0 < max_difference(adapter_weights(out / "adapter"), adapter_weights(trained_adapter))


def test_sigkill_after_checkpoint_then_resume_is_exact(reference_run, dpo_args, tmp_path):
    reference, _ = reference_run
    out = tmp_path / "run"
    sealed = out / "checkpoint-4" / "checkpoint_manifest.json"
    sigkill_when("train/run.py", *dpo_args, "--output-dir", str(out), reached=sealed.exists, what="checkpoint-4")
    assert not (out / "adapter").exists() and not (out / "checkpoint-6").exists()

    resumed = run_cli("train/run.py", *dpo_args, "--output-dir", str(out))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resume: continuing from" in resumed.stdout and "checkpoint-4" in resumed.stdout
    assert "pairs: reusing the 48 pairs this run started with" in resumed.stdout
    assert max_difference(adapter_weights(out / "adapter"), adapter_weights(reference / "adapter")) == 0.0
    expected, got = losses(reference), losses(out)
    assert got[5] == expected[5] and got[6] == expected[6]
    summary, reference_summary = (json.loads((folder / "run.json").read_text()) for folder in (out, reference))
    assert summary["heldout"] == reference_summary["heldout"]


def test_a_half_written_checkpoint_is_set_aside_and_the_result_is_the_same(reference_run, dpo_args, tmp_path):
    reference, _ = reference_run
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "adapter")
    (out / "run.json").unlink()
    weights = out / "checkpoint-6" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    resumed = run_cli("train/run.py", *dpo_args, "--output-dir", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping incomplete checkpoint checkpoint-6" in resumed.stdout and "checkpoint-4" in resumed.stdout
    assert (out / "incomplete-checkpoint-6").is_dir()
    assert max_difference(adapter_weights(out / "adapter"), adapter_weights(reference / "adapter")) == 0.0


def test_rerunning_a_finished_dpo_run_changes_nothing(reference_run, dpo_args, tmp_path):
    reference, _ = reference_run
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = _snapshot(out)
    result = run_cli("train/run.py", *dpo_args, "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"done: the run in {out} is complete (6 steps, --max-steps 6)" in result.stdout
    assert _snapshot(out) == before


def test_the_dpo_adapter_exports_like_an_sft_adapter_and_passes_verify(reference_run, llama_source_archive, tmp_path):
    out, _ = reference_run
    export = tmp_path / "export"
    result = run_cli("export/to_gguf.py", "--adapter", str(out / "adapter"), "--out", str(export), "--quant", "q4_k_m")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((export / "report.json").read_text())
    assert report["passed"] is True and all(check["passed"] for check in report["checks"])
    card = (export / "README.md").read_text()
    assert "DPO" in card and "preference pairs" in card
