"""Importance-matrix quants (export/imatrix.py, `export/to_gguf.py --imatrix`) and the per-quant facts every exported
file is checked against (export/gguf.py's QUANT_TYPES): the calibration text, the matrix file, the tiny model's
export end to end with llama.cpp's built tools, and a kill during llama-imatrix or llama-quantize."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, SAMPLE, TINY_GGUF_NAME as NAME, processes_left, processes_running, run_cli, sigkill_when
from hub_recorder import RecordingClient


# ---------------------------------------------------------------------- per-quant facts, in one place
def test_no_quant_type_lacks_a_threshold():
    from export.gguf import QUANT_TYPES
    from export.verify import check_quant_logits

    for name, kind in QUANT_TYPES.items():
        assert isinstance(kind.kld_limit, float) and 0 < kind.kld_limit <= 0.1, name
        assert isinstance(kind.taught_min_share, float) and 0 < kind.taught_min_share <= 1, name
        assert kind.label.strip(), name
        stats = {"kld_mean": kind.kld_limit * 2, "kld_p99": 0.0, "kld_max": 0.0, "top1_agreement": 1.0,
                 "positions": 1}
        check = check_quant_logits(f"m-{kind.suffix}.gguf", name, stats)
        assert check.threshold and not check.passed, name  # a file over its limit fails: none passes unchecked
    # Only the k-quants take a matrix; the 16-bit types are the converter's, not the quantizer's.
    assert {n for n, k in QUANT_TYPES.items() if k.imatrix} == {"q6_k", "q5_k_m", "q4_k_m"}
    assert {n for n, k in QUANT_TYPES.items() if not k.quantized} == {"f16", "bf16"}


def test_no_second_table_of_per_quant_facts():
    """A dict keyed by quant names anywhere in export/ except the registry could forget a type again."""
    for path in sorted((REPO / "export").glob("*.py")):
        if path.name == "gguf.py":
            continue
        assert not re.search(r"[{,]\s*\"(q8_0|q4_k_m|q5_k_m|q6_k|bf16)\"\s*:", path.read_text()), path.name


# ---------------------------------------------------------------------- settings
@pytest.mark.parametrize("args,fragment", [
    (["--quant", "q8_0", "--imatrix"], "--imatrix: only k-quants use an importance matrix (q6_k, q5_k_m, q4_k_m)"),
    (["--imatrix", "/no/such/imatrix.gguf"], "--imatrix '/no/such/imatrix.gguf': file not found"),
    (["--imatrix", "--imatrix-tokens", "100"], "--imatrix-tokens 100: must be >= 1024"),
])
def test_imatrix_usage_errors(tmp_path, args, fragment):
    from common.cli import UsageError
    from export.config import config_from_args

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError) as caught:
        config_from_args(["--adapter", str(adapter), "--out", str(tmp_path / "o"), *args])
    assert fragment in str(caught.value)
    assert config_from_args(["--adapter", str(adapter), "--imatrix"]).imatrix == "auto"


# ---------------------------------------------------------------------- calibration text
def test_calibration_text_is_the_training_split_in_the_training_template(tokenizer):
    from export.imatrix import calibration_conversations, calibration_text
    from train.conversations import prepare, render
    from train.summary import RunSummary

    run = RunSummary({"config": {"dataset": str(SAMPLE), "seed": 3407, "eval_samples": 10}})
    text, counted = calibration_text(calibration_conversations(run), tokenizer, max_tokens=10**9)
    prepared = prepare(SAMPLE, seed=3407, eval_samples=10)
    assert counted["conversations"] == len(prepared.train_rows) == 120 and not counted["repeated"]
    assert text == "".join(render(tokenizer, messages) for messages in prepared.train)  # in training order
    for held_out in prepared.eval:  # the held-out split stays out
        assert held_out[0]["content"] not in text
    assert text.startswith("<|begin_of_text|>") and "<|start_header_id|>assistant<|end_header_id|>" in text
    assert counted["tokens"] == len(tokenizer(text, add_special_tokens=False)["input_ids"])

    short, counted = calibration_text(calibration_conversations(run), tokenizer, max_tokens=1024)
    assert counted["tokens"] >= 1024 and counted["conversations"] < 120 and short == text[:len(short)]


def test_a_small_training_set_is_cycled_to_two_chunks(tokenizer):
    from export.imatrix import calibration_conversations, calibration_text
    from train.summary import RunSummary

    run = RunSummary({"config": {"dataset": "train/data/taught.jsonl", "seed": 3407, "eval_samples": 0}})
    text, counted = calibration_text(calibration_conversations(run), tokenizer, max_tokens=4096)
    assert counted["conversations"] == 5 and counted["repeated"] and counted["tokens"] >= 1024


def test_imatrix_needs_the_runs_data_or_a_file():
    from export.errors import ExportError
    from export.imatrix import calibration_conversations
    from train.summary import RunSummary

    with pytest.raises(ExportError, match="needs the training run's run.json .* pass --imatrix FILE"):
        list(calibration_conversations(None))
    # A run.json without the split's seed: guessing one could calibrate on the held-out conversations.
    with pytest.raises(ExportError, match=r"run.json with its data split \(dataset, seed, eval_samples\)"):
        list(calibration_conversations(RunSummary({"config": {"dataset": str(SAMPLE), "eval_samples": 10}})))


# ---------------------------------------------------------------------- the export, end to end
def test_export_with_imatrix_writes_a_verified_imatrix_q4_k_m(exported_imatrix):
    from common.llama_runtime import open_gguf
    from common.files import sha256_file
    from export.imatrix import imatrix_problem, read_imatrix

    out, result = exported_imatrix
    matrix, q4, q8 = out / f"{NAME}-imatrix.gguf", out / f"{NAME}-Q4_K_M.gguf", out / f"{NAME}-Q8_0.gguf"
    assert matrix.is_file() and imatrix_problem(matrix) is None
    facts = read_imatrix(matrix)
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and all(check["passed"] for check in report["checks"])
    described = report["imatrix"]
    assert described["source"] == "training conversations" and described["file"] == matrix.name
    assert described["chunks"] == facts["chunk_count"] == 8 and described["chunk_tokens"] == facts["chunk_size"] == 512
    assert described["tokens"] == 4096 and described["conversations"] > 0 and described["seconds"] > 0
    assert described["sha256"] == sha256_file(matrix) and described["quants"] == ["q4_k_m"]
    assert set(report["file_stamps"]) == {q4.name, q8.name, matrix.name}
    # llama-quantize recorded the matrix in the q4_k_m file; q8_0 was quantized as before, without one.
    assert open_gguf(q4, vocab_only=True).metadata["quantize.imatrix.file"].endswith(matrix.name)
    assert "quantize.imatrix.file" not in open_gguf(q8, vocab_only=True).metadata
    names = [check["name"] for check in report["checks"]]
    assert f"{q4.name}: importance matrix" in names and f"{q8.name}: importance matrix" not in names
    assert report["quantization"]["q4_k_m"]["kld_mean"] <= 0.1
    assert "imatrix: " in result.stdout and "with the importance matrix" in result.stdout
    card = (out / "README.md").read_text()
    assert f"`{matrix.name}`" in card and "importance matrix computed from" in card and "held-out" in card
    assert not (out / "imatrix-calibration.txt").exists() and not list(out.glob(".*.tmp-*"))

    # Truncated: refused by the reader that guards reuse and --imatrix FILE.
    truncated = out.parent / "truncated-imatrix.gguf"
    truncated.write_bytes(matrix.read_bytes()[: matrix.stat().st_size // 2])
    assert imatrix_problem(truncated) == "truncated"


def test_imatrix_rerun_is_idempotent_and_the_matrix_is_pushed(exported_imatrix, trained_adapter, monkeypatch):
    from export.cli import main

    out, _ = exported_imatrix
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")}
    result = run_cli("export/to_gguf.py", "--adapter", str(trained_adapter), "--out", str(out),
                     "--quant", "q4_k_m", "q8_0", "--imatrix", "--imatrix-tokens", "4096")
    assert result.returncode == 0 and "nothing to do" in result.stdout, result.stdout[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")} == before

    monkeypatch.setenv("HF_TOKEN", "hf_SECRET_TOKEN_123")
    client = RecordingClient()
    assert main(["--adapter", str(trained_adapter), "--out", str(out), "--quant", "q4_k_m", "q8_0", "--imatrix",
                 "--imatrix-tokens", "4096", "--push", "--repo-id", "someone/Tiny-FineTome-GGUF"], client=client) == 0
    commit = next(c for c in client.calls if c.method == "create_commit")
    assert sorted(dict(commit.operations)) == sorted(
        ["README.md", f"{NAME}-Q4_K_M.gguf", f"{NAME}-Q8_0.gguf", f"{NAME}-imatrix.gguf"])


def test_a_given_imatrix_file_is_used_and_a_static_rerun_requantizes(exported_imatrix, trained_adapter, tmp_path):
    import shutil

    from common.llama_runtime import open_gguf

    out = tmp_path / "copy"
    shutil.copytree(exported_imatrix[0], out)
    given = tmp_path / "given-imatrix.gguf"
    shutil.copy(out / f"{NAME}-imatrix.gguf", given)
    (out / f"{NAME}-imatrix.json").unlink()
    result = run_cli("export/to_gguf.py", "--adapter", str(trained_adapter), "--out", str(out), "--quant", "q4_k_m",
                     "--imatrix", str(given))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["imatrix"]["source"] == "given" and report["imatrix"]["chunks"] == 8
    # Without --imatrix, the file made with the matrix is not taken for a static one.
    result = run_cli("export/to_gguf.py", "--adapter", str(trained_adapter), "--out", str(out), "--quant", "q4_k_m")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"quantize: {NAME}-Q4_K_M.gguf is complete, skipping" not in result.stdout
    assert "quantize.imatrix.file" not in open_gguf(out / f"{NAME}-Q4_K_M.gguf", vocab_only=True).metadata
    assert json.loads((out / "report.json").read_text())["imatrix"] is None


def _kill_when(adapter: Path, out: Path, tool: str) -> None:
    """SIGKILL an imatrix export into `out` while `tool` (one of llama.cpp's, started by it) runs; the tool dies too."""
    running = (str(Path(os.environ["FINETOME_LLAMA_TOOLS"])), tool, str(out))
    sigkill_when("export/to_gguf.py", "--adapter", str(adapter), "--out", str(out), "--quant", "q4_k_m", "--imatrix",
                 "--imatrix-tokens", "4096", "--probes", "0", reached=lambda: processes_running(*running), what=tool)
    assert processes_left(*running) == []  # the tool died with the export


def test_sigkill_during_imatrix_or_quantize_leaves_no_invalid_file_and_the_rerun_completes(
        trained_adapter, llama_tools, tmp_path):
    from export.imatrix import imatrix_problem

    out = tmp_path / "killed"
    matrix, q4 = out / f"{NAME}-imatrix.gguf", out / f"{NAME}-Q4_K_M.gguf"
    _kill_when(trained_adapter, out, "llama-imatrix")
    assert not matrix.exists() and not q4.exists()
    _kill_when(trained_adapter, out, "llama-quantize")
    assert not q4.exists() and (not matrix.exists() or imatrix_problem(matrix) is None)

    result = run_cli("export/to_gguf.py", "--adapter", str(trained_adapter), "--out", str(out), "--quant", "q4_k_m",
                     "--imatrix", "--imatrix-tokens", "4096", "--probes", "0")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"convert: {NAME}-F16.gguf is complete, skipping" in result.stdout
    assert q4.is_file() and imatrix_problem(matrix) is None and not list(out.glob(".*.tmp-*"))
    assert json.loads((out / "report.json").read_text())["passed"]


def test_llama_tools_take_the_amx_safe_path_flag(llama_tools, exported_imatrix):
    """--no-repack (extra buffer types off: the AMX crash) is a common argument llama-imatrix and llama-perplexity
    accept; both decode the q4_k_m file with it."""
    out, _ = exported_imatrix
    text = out.parent / "text.txt"
    text.write_text(" ".join(["The quick brown fox jumps over the lazy dog."] * 120))
    for tool in ("llama-perplexity", "llama-imatrix"):
        extra = ["-o", str(out.parent / "m.gguf"), "--no-ppl"] if tool == "llama-imatrix" else []
        result = subprocess.run([str(llama_tools / tool), "-m", str(out / f"{NAME}-Q4_K_M.gguf"), "-f", str(text),
                                 "-c", "128", "--chunks", "2", "-t", "2", "--no-repack", *extra],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (tool, result.stderr[-2000:])


def test_the_benchmark_section_survives_a_regenerated_report(tmp_path):
    """scripts/bench.py rewrites docs/benchmarks.md from its own results; the importance-matrix section, written by
    scripts/bench_imatrix.py, is carried over (bench/imatrix.py keep_section)."""
    from bench.imatrix import BEGIN, END, keep_section

    existing = tmp_path / "benchmarks.md"
    existing.write_text(f"# Benchmarks\n\nold\n\n{BEGIN}\n## Importance matrix\n| a |\n{END}\n")
    assert keep_section("# Benchmarks\n\nnew\n", existing) == \
        f"# Benchmarks\n\nnew\n\n{BEGIN}\n## Importance matrix\n| a |\n{END}\n"
    assert keep_section("# Benchmarks\n", tmp_path / "absent.md") == "# Benchmarks\n"
