"""TrainConfig: defaults, presets, layering, and one clear line per bad value (exit code 2)."""

import dataclasses

import pytest

from conftest import run_cli
from common.cli import UsageError
from train.config import TrainConfig, available_presets, config_from_args, load_preset, resolve_local_path


def test_defaults_follow_unsloths_llama_3_2_recipe():
    config = TrainConfig()
    assert (config.lora_r, config.lora_alpha, config.lora_dropout) == (16, 16, 0.0)
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (config.max_seq_length, config.batch_size, config.grad_accum) == (2048, 2, 4)
    assert (config.learning_rate, config.warmup_steps, config.lr_scheduler) == (2e-4, 5, "linear")
    assert (config.weight_decay, config.seed) == (0.01, 3407)
    assert (config.save_steps, config.save_total_limit, config.resume) == (50, 3, "auto")
    assert config.dataset == "mlabonne/FineTome-100k"


# The *-dpo presets start from a finished SFT run, which exists only after one: tests/test_preferences.py gives them
# an adapter folder.
@pytest.mark.parametrize("name", [name for name in available_presets() if not name.endswith("-dpo")])
def test_every_preset_loads_and_validates(name):
    config = TrainConfig(**load_preset(name))
    assert config.max_steps >= 1


def test_presets_name_the_right_models():
    assert set(available_presets()) >= {"tiny", "1b", "3b"}
    assert config_from_args(["--preset", "1b"]).model_name == "unsloth/Llama-3.2-1B-Instruct"
    assert config_from_args(["--preset", "3b"]).model_name == "unsloth/Llama-3.2-3B-Instruct"
    tiny = config_from_args(["--preset", "tiny"])
    assert tiny.model_name == "builtin:tiny-llama-3.2" and resolve_local_path(tiny.dataset).is_file()


def test_layering_preset_then_config_file_then_flags(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("lora_r: 32\nlearning_rate: 1.0e-4\n")
    config = config_from_args(["--preset", "tiny", "--config", str(override), "--learning-rate", "5e-5",
                               "--target-modules", "q_proj,v_proj", "--overwrite", "--min-score", "4.5"])
    assert config.lora_r == 32 and config.learning_rate == 5e-5
    assert config.target_modules == ["q_proj", "v_proj"] and config.overwrite is True
    assert config.min_score == 4.5 and config.max_steps == 30


def test_every_field_has_a_flag():
    from train.config import build_parser

    flags = {action.dest for action in build_parser()._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= flags


def test_all_problems_are_reported_at_once():
    with pytest.raises(UsageError) as caught:
        config_from_args(["--preset", "tiny", "--lora-r", "0", "--learning-rate", "3", "--backend", "tpu",
                          "--target-modules", "q_proj,qkv", "--max-steps", "0", "--report-to", "mlflow"])
    problems = caught.value.problems
    assert len(problems) == 6
    joined = "\n".join(problems)
    for expected in ("--lora-r 0: must be a number >= 1", "--learning-rate 3.0: must be in (0, 1]",
                     "--backend 'tpu': choose one of: auto, unsloth, hf", "--target-modules 'q_proj,qkv'",
                     "--max-steps 0", "--report-to 'mlflow': choose one of: none, tensorboard, wandb"):
        assert expected in joined


@pytest.mark.parametrize("field,value,fragment", [
    ("dataset", "missing/file.jsonl", "file not found"),
    ("dataset", "notes.txt", "not a Hub id"),
    ("model_name", "builtin:huge", "the only built-in model"),
    ("resume", "/no/such/checkpoint", "use auto, never, or an existing checkpoint folder"),
    ("max_seq_length", 16, "must be >= 64"),
    ("eval_samples", -1, "must be a number >= 0"),
    ("lora_dropout", 1.5, "must be in [0, 1)"),
    ("batch_size", 2.5, "must be a whole number"),  # from a YAML config; transformers fails on it mid-setup
    ("save_steps", 10.0, "must be a whole number"),
    ("output_dir", "/dev/null", "exists and is not a folder; choose a folder this user can write"),
    ("output_dir", "/dev/null/run", "/dev/null is a file, not a folder"),
])
def test_bad_values_name_flag_value_and_fix(field, value, fragment):
    with pytest.raises(UsageError) as caught:
        TrainConfig(**{**load_preset("tiny"), field: value})
    (problem,) = caught.value.problems
    assert problem.startswith(f"--{field.replace('_', '-')} ") and fragment in problem


def test_yaml_with_unknown_field_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rank: 8\n")
    with pytest.raises(UsageError, match="unknown field.*lora_rank"):
        config_from_args(["--config", str(bad)])


@pytest.mark.parametrize("contents, fragment", [
    ("batch_size: 2.5\n", "error: --batch-size 2.5: must be a whole number"),
    (None, "is a folder; give a YAML file of field: value"),  # --config names a directory
    (b"\xff\xfe not text", "cannot be read ("),
])
def test_config_file_mistakes_are_one_line(tmp_path, contents, fragment):
    config = tmp_path / "config.yaml"
    if contents is None:
        config.mkdir()
    else:
        config.write_bytes(contents if isinstance(contents, bytes) else contents.encode())
    result = run_cli("train/run.py", "--preset", "tiny", "--config", str(config), "--output-dir", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0]
    assert not (tmp_path / "o").exists()


def test_cli_bad_flags_exit_2_with_one_line_each_and_no_traceback(tiny_model_dir):
    result = run_cli("train/run.py", "--preset", "tiny", "--lora-r", "0", "--batch-size", "-3", "--dataset", "nope.jsonl")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: --") for line in lines)
    assert "Traceback" not in result.stderr
    unknown = run_cli("train/run.py", "--lora-rank", "8")
    assert unknown.returncode == 2 and unknown.stderr.strip().count("\n") == 0
    assert "unrecognized arguments: --lora-rank" in unknown.stderr


def test_help_runs_from_a_fresh_checkout():
    result = run_cli("train/run.py", "--help")
    assert result.returncode == 0
    for flag in ("--max-steps", "--save-steps", "--save-total-limit", "--output-dir", "--dataset", "--max-samples",
                 "--min-score", "--eval-samples", "--seed", "--learning-rate", "--lora-r", "--lora-alpha",
                 "--max-seq-length", "--batch-size", "--grad-accum", "--report-to", "--resume", "--backend"):
        assert flag in result.stdout
