"""The prepared data beside the checkpoints: only what the run reads is tokenized, a matching rerun reuses it, and
every change to the source or to a setting that shapes the data prepares it again."""

import json
import os
import shutil

import pytest
from conftest import SAMPLE

from train.config import TrainConfig
from train.conversations import prepare, tokenize_conversation
from train.prepared import PreparedStore, train_rows_needed


def config_for(tmp_path, **overrides) -> TrainConfig:
    dataset = tmp_path / "rows.jsonl"
    if not dataset.exists():
        shutil.copy(SAMPLE, dataset)
    values = dict(dataset=str(dataset), output_dir=str(tmp_path / "run"), seed=3407, eval_samples=10,
                  max_steps=3, batch_size=2, grad_accum=2, max_seq_length=512)
    return TrainConfig(**{**values, **overrides})


def prepare_once(config: TrainConfig, tokenizer, log=None):
    store = PreparedStore(config.output_dir)
    manifest, why = store.find(config)
    prepared = store.scan(config) if manifest is None else None
    return store.finish(config, manifest, prepared, tokenizer, log or (lambda line: None)), why


def test_rows_a_run_reads():
    assert train_rows_needed(TrainConfig(max_steps=60, batch_size=2, grad_accum=4)) == 480
    assert train_rows_needed(TrainConfig(max_steps=-1)) is None


def test_rows_a_run_reads_count_every_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_rows_needed(TrainConfig(max_steps=60, batch_size=2, grad_accum=4)) == 960


def test_only_what_the_steps_read_is_tokenized_first_in_the_shuffled_order(tmp_path, tokenizer):
    config = config_for(tmp_path)
    data, why = prepare_once(config, tokenizer)
    assert why == "none prepared yet" and not data.reused
    reference = prepare(config.dataset, seed=3407, eval_samples=10)
    assert len(data.train) == 3 * 2 * 2 and data.info["train"] == 12 and data.info["rows"] == 130
    expected = [tokenize_conversation(c, tokenizer) for c in reference.conversations(reference.train_rows[:12])]
    assert [dict(row) for row in data.train] == expected
    assert [dict(row) for row in data.eval] == [tokenize_conversation(c, tokenizer) for c in reference.eval]
    folder = tmp_path / "run" / "data"
    assert sorted(p.name for p in folder.iterdir()) == ["eval", "prepared.json", "train"]
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # the scan's files are gone


def test_a_matching_rerun_reuses_and_every_change_prepares_again(tmp_path, tokenizer):
    config = config_for(tmp_path)
    first, _ = prepare_once(config, tokenizer)
    again, why = prepare_once(config, tokenizer)
    assert again.reused and why == "" and [dict(r) for r in again.train] == [dict(r) for r in first.train]

    dataset = tmp_path / "rows.jsonl"
    os.utime(dataset, ns=(1, 1))  # touched or copied: same bytes, same data
    assert prepare_once(config, tokenizer)[0].reused

    for change, reason in [(dict(seed=1), "seed"), (dict(max_steps=4), "train_rows"), (dict(grad_accum=1), "train_rows"),
                           (dict(max_seq_length=256), "max_seq_length"), (dict(eval_samples=5), "eval_samples"),
                           (dict(min_score=3.5), "min_score"), (dict(max_samples=50), "max_samples")]:
        manifest, why = PreparedStore(config.output_dir).find(config_for(tmp_path, **change))
        assert manifest is None and why == f"changed since it was prepared: {reason}"

    with dataset.open("a") as handle:
        handle.write(json.dumps({"conversations": [{"from": "human", "value": "new"},
                                                    {"from": "gpt", "value": "row"}]}) + "\n")
    manifest, why = PreparedStore(config.output_dir).find(config)
    assert manifest is None and why == f"{dataset} changed since it was prepared"
    changed, _ = prepare_once(config, tokenizer)
    assert not changed.reused and changed.info["rows"] == 131


def test_another_tokenizer_prepares_again(tmp_path, tokenizer):
    config = config_for(tmp_path)
    prepare_once(config, tokenizer)
    manifest_file = tmp_path / "run" / "data" / "prepared.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["tokenizer"] = "0" * 64
    manifest_file.write_text(json.dumps(manifest))
    lines = []
    data, why = prepare_once(config, tokenizer, lines.append)
    assert why == "" and not data.reused
    assert lines == ["data: the tokenizer changed since the data was prepared; preparing again"]


def test_conversations_lost_to_truncation_are_topped_up_in_order(tmp_path, tokenizer):
    rows = []
    for i in range(40):
        prompt = "word " * (400 if i % 3 == 0 else 5)  # every third prompt leaves no answer within 128 tokens
        rows.append({"conversations": [{"from": "human", "value": f"{i} {prompt}"}, {"from": "gpt", "value": "ok"}]})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = config_for(tmp_path, eval_samples=0, max_steps=5, batch_size=2, grad_accum=2, max_seq_length=128)
    data, _ = prepare_once(config, tokenizer)
    reference = prepare(config.dataset, seed=3407)
    kept = [c for c in reference.train if not c[0]["content"].startswith(tuple(f"{i} " for i in range(0, 40, 3)))]
    assert len(data.train) == 20 and data.info["dropped"] > 0 and data.info["truncated"] == data.info["dropped"]
    assert [dict(row) for row in data.train] == [tokenize_conversation(c, tokenizer) for c in kept[:20]]
    assert data.eval is None and data.info["eval"] == 0


def test_what_a_killed_preparation_left_is_removed(tmp_path, tokenizer):
    config = config_for(tmp_path)
    stale = tmp_path / "run" / ".data.tmp-999999"
    (stale / ".scan-x").mkdir(parents=True)
    (stale / ".scan-x" / "text-train.arrow").write_bytes(b"x" * 1000)
    manifest, why = PreparedStore(config.output_dir).find(config)
    assert manifest is None and not stale.exists()


@pytest.mark.parametrize("content", ["not json at all", '{"settings": 1}'])
def test_an_unreadable_or_foreign_manifest_prepares_again(tmp_path, tokenizer, content):
    config = config_for(tmp_path)
    prepare_once(config, tokenizer)
    (tmp_path / "run" / "data" / "prepared.json").write_text(content)
    data, why = prepare_once(config, tokenizer)
    assert not data.reused and why


def test_a_prepared_folder_missing_a_split_prepares_again(tmp_path, tokenizer):
    config = config_for(tmp_path)
    prepare_once(config, tokenizer)
    shutil.rmtree(tmp_path / "run" / "data" / "train")
    manifest, why = PreparedStore(config.output_dir).find(config)
    assert manifest is None and why == f"{tmp_path / 'run' / 'data' / 'train'} is missing"
    assert not prepare_once(config, tokenizer)[0].reused
