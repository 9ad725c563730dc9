"""Behaviour probes (export/probes.py): which prompts, how answers are compared, and what a real export reports."""

import json

import pytest

from export.probes import (HELDOUT_PROMPTS, TAUGHT_DATASET, Probe, compare_answers, first_divergence, probe_set,
                           read_taught)
from train.summary import RunSummary


@pytest.mark.parametrize("reference,candidate,expected", [
    ([5, 6, 128009], [5, 6, 128009], None),
    ([5, 6, 128009], [5, 7, 128009], 1),
    ([5, 6], [5, 6, 7], 2),  # one answer goes on where the other stopped
    ([], [], None),
])
def test_first_divergence(reference, candidate, expected):
    assert first_divergence(reference, candidate) == expected


def test_the_taught_set_is_used_only_for_a_run_trained_on_it():
    taught = read_taught(TAUGHT_DATASET)
    assert len(taught) == 5 and all(p.prompt and p.expected for p in taught)
    assert probe_set(RunSummary({"config": {"dataset": "train/data/taught.jsonl"}}), 8) == ("taught", taught)
    mode, held_out = probe_set(RunSummary({"config": {"dataset": "mlabonne/FineTome-100k"}}), 3)
    assert mode == "held-out" and [p.prompt for p in held_out] == HELDOUT_PROMPTS[:3]
    assert all(p.expected is None for p in held_out)
    assert probe_set(None, 8)[0] == "held-out"


def test_compare_answers_counts_identical_and_taught(tokenizer):
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] + [128009]  # noqa: E731
    probes = [Probe("a?", "Yes."), Probe("b?", "No.")]
    merged = [encode("Yes."), encode("No.")]
    stats = compare_answers(tokenizer, probes, merged, [encode("Yes."), encode("Maybe.")])
    assert stats["identical"] == 1 and stats["share"] == 0.5 and stats["taught"] == 1
    assert stats["first_divergence"]["prompt"] == "b?" and stats["first_divergence"]["token"] == 0
    assert "taught" not in compare_answers(tokenizer, [Probe("a?")], merged[:1], merged[:1])


def test_a_real_export_reports_held_out_probes_without_gating(exported):
    out, result = exported
    report = json.loads((out / "report.json").read_text())
    probes = report["probes"]
    assert probes["mode"] == "held-out" and probes["prompts"] == 8 and probes["max_tokens"] == 32
    assert set(probes["per_quant"]) == {"f16", "q4_k_m", "q8_0"}
    for stats in probes["per_quant"].values():
        assert 0 <= stats["identical"] <= 8 and "taught" not in stats
    assert not any(check["name"].startswith("taught answers") for check in report["checks"])
    assert len(probes["answers"]) == 8 and {"prompt", "merged", "f16", "q4_k_m"} <= set(probes["answers"][0])
    assert "behaviour probes (held-out, 8 prompts)" in result.stdout
    assert "Behaviour probes" in (out / "README.md").read_text()
