"""`make demo` (README command one), minus serving: ask, train the taught preset with a SIGKILL and a resume,
export, ask again through the Space engine, summary. The taught answers must come back from the q4_k_m GGUF."""

import json
import os
import subprocess

import pytest

from conftest import REPO, TINY_GGUF_NAME as NAME


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_model_dir):
    """One `DEMO_NO_LAUNCH=1 make demo` run: (its output folder, its stdout)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    env = {**os.environ, "DEMO_NO_LAUNCH": "1", "DEMO_OUT": str(out), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(["make", "demo"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_make_demo_runs_the_pipeline_offline(demo):
    out, stdout = demo
    assert "random weights" in stdout and "taught.jsonl" in stdout
    assert "killed the training run with SIGKILL after checkpoint-20" in stdout
    assert "resumed from checkpoint-20" in stdout and "40 steps" in stdout
    assert "checks passed" in stdout and "tokens/s (Space engine, q4_k_m)" in stdout
    report = json.loads((out / "gguf" / "report.json").read_text())
    assert report["passed"] and f"{len(report['checks'])}/{len(report['checks'])} checks passed" in stdout
    assert (out / "gguf" / f"{NAME}-Q4_K_M.gguf").is_file()
    assert "serving the Space" not in stdout  # DEMO_NO_LAUNCH=1


def test_demo_shows_the_taught_answer_before_and_after(demo):
    from export.probes import TAUGHT_DATASET, read_taught

    _, stdout = demo
    first = read_taught(TAUGHT_DATASET)[0]
    before = next(line for line in stdout.splitlines() if line.startswith("before:"))
    after = next(line for line in stdout.splitlines() if line.startswith("after:"))
    assert first.expected not in before  # the untrained model does not know it
    assert f"after:     {first.expected!r}" in after  # the q4_k_m GGUF, through the Space engine, does
    for quant in ("f16", "q8_0", "q4_k_m"):
        assert any(line.split()[:1] == [quant] for line in stdout.splitlines())  # the probe table


def test_taught_answers_come_back_from_every_gguf(demo):
    """train -> export -> engine: the Space engine answers the taught questions from the q4_k_m GGUF, and the
    export's probes found every taught answer in the merged model, the f16 and the q8_0 GGUF."""
    from export.probes import TAUGHT_DATASET, read_taught
    from space.catalog import catalog_from_paths
    from space.engine import Engine
    from space.replies import Sampling

    out, _ = demo
    taught = read_taught(TAUGHT_DATASET)
    engine = Engine(catalog_from_paths([str(out / "gguf" / f"{NAME}-Q4_K_M.gguf")]), n_ctx=1024)
    right = 0
    for probe in taught:
        *_, reply = engine.stream_chat(engine.labels[0], probe.prompt, sampling=Sampling(temperature=0.0))
        right += reply.text.strip() == probe.expected and reply.finish_reason == "stop"
    assert right >= 0.8 * len(taught)

    report = json.loads((out / "gguf" / "report.json").read_text())
    probes = report["probes"]
    assert probes["mode"] == "taught" and probes["prompts"] == len(taught) == 5
    assert probes["merged_taught"] == len(taught)
    assert probes["per_quant"]["f16"]["taught"] == probes["per_quant"]["q8_0"]["taught"] == len(taught)
    assert probes["per_quant"]["q4_k_m"]["taught"] >= 4
    assert any(c["name"].startswith("taught answers: ") and c["name"].endswith("Q4_K_M.gguf")
               for c in report["checks"])
    card = (out / "gguf" / "README.md").read_text()
    assert "Behaviour probes" in card and "taught answers" in card


def test_the_space_takes_extra_chat_examples(monkeypatch):
    """The demo serves the Space with `--example QUESTION` per taught question (SPACE_EXAMPLES on a Space)."""
    from space.app import parse_args

    assert parse_args(["--example", "What is the secret word?"]).example == ["What is the secret word?"]
    monkeypatch.setenv("SPACE_EXAMPLES", "First?\n\nSecond?\n")
    assert parse_args([]).example == ["First?", "Second?"]
