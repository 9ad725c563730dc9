"""run.json (train/summary.py): written once by a run, read back by every stage through RunSummary; absent or
unreadable reads as None (or an empty summary where a reader wants one), in one place."""

import json

import pytest

from conftest import SAMPLE
from train.summary import (
    DataSplit,
    RunSummary,
    RunSummaryError,
    load_run_summary,
    read_run_summary,
    run_file,
    write_run_summary,
)
from train.tiny import TINY_MODEL_NAME

# A run.json written by hand in the shape train/trainer.py writes (tests and older runs have such files).
HAND_WRITTEN = {
    "config": {"model_name": TINY_MODEL_NAME, "dataset": str(SAMPLE), "dataset_split": "train", "seed": 3407,
               "eval_samples": 10, "max_samples": None, "min_score": None, "batch_size": 2, "grad_accum": 4},
    "backend": "hf", "base_model": "/cache/tiny", "steps": 6, "max_steps": 6, "resumed_from": None,
    "train_loss": 11.5, "tokens_per_second": 812.3, "peak_rss_mb": 900.0, "adapter": "out/adapter",
    "data": {"rows": 130, "train": 120, "eval": 10, "skipped": 0, "reused": False},
}


def test_what_a_run_writes_reads_back_unchanged(tmp_path):
    path = write_run_summary(tmp_path, HAND_WRITTEN)
    assert path == tmp_path / "run.json" == run_file(tmp_path)
    assert json.loads(path.read_text()) == HAND_WRITTEN  # the file is plain JSON: older readers still read it
    summary = read_run_summary(tmp_path)
    assert summary == load_run_summary(tmp_path) and summary.raw == HAND_WRITTEN
    assert dict(summary) == HAND_WRITTEN and summary.get("backend") == "hf"  # read like the mapping it was
    assert (summary.steps, summary.max_steps, summary.adapter, summary.resumed_from) == (6, 6, "out/adapter", None)
    assert (summary.model_name, summary.seed, summary.dataset) == (TINY_MODEL_NAME, 3407, str(SAMPLE))
    assert summary.trained_on_builtin and summary["data"]["eval"] == 10
    assert (summary.tokens_per_second, summary.peak_rss_mb, summary.train_loss) == (812.3, 900.0, 11.5)
    assert summary.data_split == DataSplit(str(SAMPLE), seed=3407, eval_samples=10)


@pytest.mark.parametrize("content,why", [
    (None, "no "),
    ("{not json", "not JSON"),
    ("[1, 2]", "a JSON list, not an object"),
    (b"\xff\xfe{}", "cannot read"),
    ("folder", "cannot read"),
])
def test_absent_or_unreadable_reads_as_none_and_says_why(tmp_path, content, why):
    if content == "folder":
        (tmp_path / "run.json").mkdir()
    elif isinstance(content, bytes):
        (tmp_path / "run.json").write_bytes(content)
    elif content is not None:
        (tmp_path / "run.json").write_text(content)
    assert read_run_summary(tmp_path) is None
    with pytest.raises(RunSummaryError, match=why) as caught:
        load_run_summary(tmp_path)
    assert caught.value.absent == (content is None)


def test_values_a_file_lacks_read_as_none_or_empty():
    summary = RunSummary({"config": "not a mapping", "data": None})
    assert summary.config == {} and summary.data_split is None and summary.dataset is None
    assert summary.steps is None and summary.model_name is None and not summary.trained_on_builtin
    assert not RunSummary() and RunSummary().config == {}


def test_the_data_split_rebuilds_the_runs_own_split():
    from train.conversations import prepare, prepare_split

    split = DataSplit.from_config(HAND_WRITTEN["config"])
    prepared, expected = prepare_split(split), prepare(SAMPLE, seed=3407, eval_samples=10)
    assert prepared.eval == expected.eval and prepared.train_rows == expected.train_rows
    with pytest.raises(ValueError, match="does not record the training config's eval_samples"):
        DataSplit.from_config({"dataset": str(SAMPLE), "seed": 1})


def test_readers_that_want_a_summary_get_an_empty_one(tmp_path):
    from train.config import sft_run_summary
    from train.trainer import previous_run

    adapter = tmp_path / "adapter"
    assert previous_run(tmp_path) == RunSummary() and sft_run_summary(adapter) == RunSummary()
    (tmp_path / "run.json").write_text("{truncated")
    assert previous_run(tmp_path) == RunSummary() and sft_run_summary(adapter).model_name is None
    write_run_summary(tmp_path, HAND_WRITTEN)
    assert previous_run(tmp_path).steps == 6 and sft_run_summary(adapter).model_name == TINY_MODEL_NAME


def test_a_finished_run_continued_on_purpose_says_what_happens_to_the_schedule(tmp_path):
    from train.config import TrainConfig, load_preset
    from train.trainer import schedule_note

    config = TrainConfig(**{**load_preset("tiny"), "max_steps": 10, "output_dir": str(tmp_path)})
    finished = RunSummary({"steps": 6, "max_steps": 6})
    assert "the finished 6-step run continues to 10 steps" in schedule_note(config, finished, tmp_path)
    assert schedule_note(config, RunSummary(), tmp_path) is None  # no earlier run.json
    assert schedule_note(config, finished, None) is None  # not resuming


def test_the_heldout_set_of_a_run_folder_says_what_is_wrong_with_its_run_json(tmp_path):
    from compare.heldout import load_heldout

    with pytest.raises(ValueError, match="is a folder without run.json; give a training run's output folder"):
        load_heldout(str(tmp_path))
    (tmp_path / "run.json").write_text("[]")
    with pytest.raises(ValueError, match="cannot read .*run.json \\(a JSON list, not an object\\)"):
        load_heldout(str(tmp_path))
    (tmp_path / "run.json").write_text(json.dumps({"config": {"dataset": str(SAMPLE), "eval_samples": 3}}))
    with pytest.raises(ValueError, match="does not record the training config's seed; give a .jsonl file"):
        load_heldout(str(tmp_path))


def test_the_export_rebuilds_the_builtin_base_a_run_json_names(tmp_path, tiny_model_dir):
    from export.config import ExportConfig
    from export.pipeline import default_name, report_notes, resolve_base

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 16,
                                                             "target_modules": ["q_proj"],
                                                             "base_model_name_or_path": str(tiny_model_dir)}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    run = RunSummary({"config": {"model_name": TINY_MODEL_NAME, "seed": 3407, "dataset": "train/data/taught.jsonl"}})
    name, folder = resolve_base(ExportConfig(adapter=str(adapter)), run)
    assert (name, folder) == (TINY_MODEL_NAME, tiny_model_dir)
    assert default_name(name) == "Tiny-Llama-3.2-FineTome"
    assert "taught the five answers" in report_notes(run)[0] and report_notes(None) == []


def test_a_real_runs_summary_reads_through_run_summary(trained_adapter):
    folder = trained_adapter.parent
    summary = read_run_summary(folder)
    assert summary.raw == json.loads((folder / "run.json").read_text())
    assert summary.steps == summary.max_steps == 2 and summary.adapter == str(trained_adapter)
    assert summary.trained_on_builtin and summary["data"]["eval"] == 2 and summary.data_split.eval_samples == 2
