"""The export stage end to end on the tiny preset's adapter: real merge, llama.cpp's converter and quantizer,
every verification check, atomicity under SIGKILL, idempotent reruns, the push recorder, and each error."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_GGUF_NAME as NAME, processes_left, processes_running, run_cli, sigkill_when
from hub_recorder import RecordingClient


def test_export_writes_verified_q4_k_m_and_q8_0(exported):
    out, result = exported
    q4, q8 = out / f"{NAME}-Q4_K_M.gguf", out / f"{NAME}-Q8_0.gguf"
    assert q4.is_file() and q8.is_file()
    assert not (out / f"{NAME}-F16.gguf").exists()  # deleted without --keep-f16
    assert not list(out.glob(".*.tmp-*"))
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True and all(check["passed"] for check in report["checks"])
    names = " | ".join(check["name"] for check in report["checks"])
    for expected in ("architecture", "pre-tokenizer", "eos token", "chat template", "file type",
                     "tokenizer parity", "chat-template parity", "logit parity", "quantization error: " + q4.name,
                     "quantization error: " + q8.name, "chat completion"):
        assert expected in names
    assert report["logits_f16_vs_merged"]["top1_agreement_ties"] >= 0.99
    assert report["logits_f16_vs_merged"]["max_abs_diff"] < 0.05
    assert report["quantization"]["q8_0"]["kld_mean"] <= 0.005
    assert report["quantization"]["q4_k_m"]["kld_mean"] <= 0.1
    assert [f["name"] for f in report["files"]] == [q4.name, q8.name]
    assert q4.stat().st_size < q8.stat().st_size
    assert "verify:" in result.stdout and str(q4) in result.stdout
    # Which llama.cpp path every GGUF was decoded with, and why: said once, and kept in the report.
    from common.llama_runtime import extra_buffers

    assert result.stdout.count("runtime: llama.cpp ") == 1
    assert f"runtime: {extra_buffers().describe()}" in result.stdout
    assert report["llama_cpp_extra_buffers"] == {"enabled": extra_buffers().enabled, "reason": extra_buffers().reason}


def test_gguf_is_llama_3_and_chats_in_llama_cpp_python(exported):
    from common.llama_runtime import open_gguf

    out, _ = exported
    llm = open_gguf(out / f"{NAME}-Q4_K_M.gguf", n_ctx=512)
    assert llm.metadata["tokenizer.ggml.pre"] == "llama-bpe"
    assert llm.metadata["tokenizer.ggml.eos_token_id"] == "128009" and llm.token_eos() == 128009
    assert llm.metadata["general.file_type"] == "15"  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert "<|start_header_id|>" in llm.metadata["tokenizer.chat_template"]
    reply = llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0)
    assert reply["choices"][0]["message"]["content"]


def test_merged_folder_loads_in_transformers(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    merged = exported[0] / "merged-16bit"
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert str(model.dtype) == "torch.float16"
    assert AutoTokenizer.from_pretrained(merged).chat_template
    assert 128009 in GenerationConfig.from_pretrained(merged).eos_token_id


def test_model_card_has_front_matter_and_figures(exported):
    out, _ = exported
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "llama3.2" and "mlabonne/FineTome-100k" in front["datasets"]
    assert "gguf" in front["tags"] and "unsloth" not in front["tags"]  # trained with the hf backend
    assert f'model_path="{NAME}-Q4_K_M.gguf"' in card and f"{NAME}-Q8_0.gguf" in card  # no repo yet: local use
    assert "KLD" in card and "✅" in card


def test_rerun_is_idempotent(exported, trained_adapter):
    out, _ = exported
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")}
    result = run_cli("export/to_gguf.py", "--adapter", str(trained_adapter), "--out", str(out),
                     "--quant", "q4_k_m", "q8_0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "nothing to do" in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")} == before


def test_missing_quant_is_redone_and_merge_is_skipped(exported, trained_adapter, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(exported[0], out)
    (out / f"{NAME}-Q8_0.gguf").unlink()
    result = run_cli("export/to_gguf.py", "--adapter", str(trained_adapter), "--out", str(out),
                     "--quant", "q4_k_m", "q8_0", "--probes", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "merge: " in result.stdout and "is complete, skipping" in result.stdout
    assert f"quantize: {NAME}-Q4_K_M.gguf is complete, skipping" in result.stdout
    assert (out / f"{NAME}-Q8_0.gguf").is_file()


def test_final_names_that_do_not_load_are_made_again(exported, trained_adapter, tmp_path):
    """A file under a final .gguf name that llama.cpp cannot load (not a GGUF; a truncated one) is never trusted."""
    out = tmp_path / "copy"
    shutil.copytree(exported[0], out)
    (out / f"{NAME}-Q8_0.gguf").write_bytes(b"not a GGUF at all")
    q4 = out / f"{NAME}-Q4_K_M.gguf"
    q4.write_bytes(q4.read_bytes()[: q4.stat().st_size // 2])
    result = run_cli("export/to_gguf.py", "--adapter", str(trained_adapter), "--out", str(out),
                     "--quant", "q4_k_m", "q8_0", "--probes", "0")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for name in (f"{NAME}-Q4_K_M.gguf", f"{NAME}-Q8_0.gguf"):
        assert f"export: {name} is not a loadable GGUF (" in result.stdout and "making it again" in result.stdout
        assert f"quantize: {name} is complete, skipping" not in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and q4.stat().st_size == (exported[0] / q4.name).stat().st_size


# The kill-and-rerun tests (and the redo tests above) prove what a dead or damaged export leaves and that the rerun
# completes; the behaviour probes (greedy answers of the merged model vs the GGUF) are
# test_export_writes_verified_q4_k_m_and_q8_0's, so these skip them.
KILLED_EXPORT = ("--quant", "q4_k_m", "--probes", "0")


def _sigkill_export_once(adapter: Path, out: Path, reached, stage: str) -> None:
    """Start a q4_k_m export into `out` and SIGKILL it as soon as `reached()` says it is in `stage`."""
    sigkill_when("export/to_gguf.py", "--adapter", str(adapter), "--out", str(out), *KILLED_EXPORT,
                 reached=reached, what=stage)


def test_sigkill_during_conversion_takes_the_converter_with_it(trained_adapter, llama_source_archive, tmp_path):
    out = tmp_path / "killed-convert"
    converter = ("convert_hf_to_gguf", str(out))  # the converter is given its output path
    _sigkill_export_once(trained_adapter, out, lambda: processes_running(*converter), "conversion")
    assert processes_left(*converter) == []  # no orphan converter left writing
    result = run_cli("export/to_gguf.py", "--adapter", str(trained_adapter), "--out", str(out), *KILLED_EXPORT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / f"{NAME}-Q4_K_M.gguf").is_file() and not list(out.glob(".*.tmp-*"))


def test_sigkill_during_quantization_leaves_no_partial_file(trained_adapter, llama_source_archive, tmp_path):
    out = tmp_path / "killed"
    _sigkill_export_once(trained_adapter, out, lambda: list(out.glob(f".{NAME}-Q4_K_M.gguf.tmp-*")), "quantization")
    assert not (out / f"{NAME}-Q4_K_M.gguf").exists()
    assert (out / f"{NAME}-F16.gguf").is_file()  # completed stages stay

    result = run_cli("export/to_gguf.py", "--adapter", str(trained_adapter), "--out", str(out), *KILLED_EXPORT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "removed" in result.stdout and "left by an interrupted run" in result.stdout
    assert f"convert: {NAME}-F16.gguf is complete, skipping" in result.stdout
    assert (out / f"{NAME}-Q4_K_M.gguf").is_file() and not list(out.glob(".*.tmp-*"))


def test_push_uploads_the_files_and_card_in_one_commit(exported, trained_adapter, monkeypatch, capsys):
    from export.cli import main

    out, _ = exported
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET_TOKEN_123")
    client = RecordingClient()
    assert main(["--adapter", str(trained_adapter), "--out", str(out), "--quant", "q4_k_m", "q8_0",
                 "--push", "--repo-id", "someone/Tiny-FineTome-GGUF", "--private"], client=client) == 0
    create, commit = [c for c in client.calls if c.method in ("create_repo", "create_commit")]
    assert create.arguments["repo_id"] == "someone/Tiny-FineTome-GGUF" and create.arguments["private"] is True
    assert commit.arguments["repo_id"] == "someone/Tiny-FineTome-GGUF"
    files = dict(commit.operations)
    assert sorted(files) == sorted(["README.md", f"{NAME}-Q4_K_M.gguf", f"{NAME}-Q8_0.gguf"])
    card = files["README.md"]
    card = card.decode() if isinstance(card, bytes) else Path(card).read_text()
    assert 'Llama.from_pretrained(repo_id="someone/Tiny-FineTome-GGUF", filename="*Q4_K_M.gguf"' in card
    captured = capsys.readouterr()
    for text in (captured.out, captured.err, card, (out / "report.json").read_text()):
        assert "hf_SECRET_TOKEN_123" not in text


@pytest.mark.parametrize("args,fragment,code", [
    (["--adapter", "/no/such/adapter"], "--adapter '/no/such/adapter': folder not found", 2),
    (["--quant", "q4km"], "--quant q4km: unknown quant type; choose from: f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m", 2),
    (["--push"], "--push: needs --repo-id USER/NAME", 2),
    (["--probes", "-1"], "--probes -1: must be >= 0 (0 skips the behaviour probes)", 2),
    (["--push", "--repo-id", "not a repo"], "--repo-id 'not a repo': must look like USER/NAME", 2),
    (["--out", "/dev/null"], "--out '/dev/null': exists and is not a folder; choose a folder this user can write", 2),
    (["--out", "/dev/null/o"], "--out '/dev/null/o': /dev/null is a file, not a folder", 2),
])
def test_usage_errors_are_one_line(trained_adapter, args, fragment, code, tmp_path):
    if args[0] != "--adapter":
        args = ["--adapter", str(trained_adapter), *args]
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "o")]
    result = run_cli("export/to_gguf.py", *args)
    assert result.returncode == code
    assert fragment in result.stderr and result.stderr.strip().count("\n") == 0
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


def test_incomplete_and_corrupt_adapters_are_refused(trained_adapter, tmp_path):
    incomplete = tmp_path / "incomplete"
    shutil.copytree(trained_adapter, incomplete)
    (incomplete / "adapter_model.safetensors").unlink()
    result = run_cli("export/to_gguf.py", "--adapter", str(incomplete), "--out", str(tmp_path / "o1"))
    assert result.returncode == 2 and "incomplete adapter" in result.stderr

    corrupt = tmp_path / "corrupt" / "adapter"
    shutil.copytree(trained_adapter.parent, corrupt.parent, ignore=shutil.ignore_patterns("checkpoint-*"))
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = run_cli("export/to_gguf.py", "--adapter", str(corrupt), "--out", str(tmp_path / "o2"))
    assert result.returncode == 1 and result.stderr.startswith("error: ")
    assert "adapter_model.safetensors" in result.stderr and result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "o2" / "merged-16bit").exists()


def test_base_of_another_shape_is_refused(trained_adapter, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-base"
    LlamaForCausalLM(LlamaConfig(vocab_size=128256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
                     ).save_pretrained(other)
    result = run_cli("export/to_gguf.py", "--adapter", str(trained_adapter), "--base", str(other),
                     "--out", str(tmp_path / "o"))
    assert result.returncode == 1 and "shape" in result.stderr and "--base" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and not (tmp_path / "o" / "merged-16bit").exists()


def test_not_enough_disk_is_refused_before_work(trained_adapter, tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    from export import pipeline
    from export.cli import main

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    assert main(["--adapter", str(trained_adapter), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "not enough disk" in err and "GiB needed" in err and not (tmp_path / "o" / "merged-16bit").exists()


@pytest.mark.parametrize("client, fragment", [
    (dict(role="read"), "--push: the token is read-only; create one with write access"),
    (dict(user="bob", orgs=("bobs-lab",)), "someone/Tiny-FineTome-GGUF: the token belongs to 'bob', who cannot create "
                                           "repos under 'someone'; use a repo id under bob, bobs-lab"),
    (dict(fail={"whoami": "401"}), "checking the token with the Hugging Face Hub failed (HTTP 401): the Hub did not "
                                   "accept the token"),
])
def test_push_is_checked_with_the_hub_before_any_work(trained_adapter, tmp_path, monkeypatch, capsys, client,
                                                      fragment):
    from export.cli import main
    from hub_recorder import hub_error

    if "fail" in client:
        client = {"fail": {"whoami": hub_error(401, "Invalid credentials in Authorization header")}}
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET_TOKEN_123")
    recorder = RecordingClient(token="hf_SECRET_TOKEN_123", **client)
    out = tmp_path / "never"
    assert main(["--adapter", str(trained_adapter), "--out", str(out), "--push", "--repo-id",
                 "someone/Tiny-FineTome-GGUF"], client=recorder) == 1
    assert [call.method for call in recorder.calls] == ["whoami"]  # nothing created, nothing uploaded
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and fragment in error and "hf_SECRET" not in error
    assert not out.exists()  # no merge, no conversion: found before any work


def test_push_without_token_fails_before_any_work(trained_adapter, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env["HF_HOME"] = str(tmp_path / "empty-hf-home")
    result = subprocess.run([sys.executable, str(REPO / "export/to_gguf.py"), "--adapter", str(trained_adapter),
                             "--out", str(tmp_path / "o"), "--push", "--repo-id", "me/model"],
                            cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --push needs a Hugging Face token: set HF_TOKEN or run `hf auth login`"
    assert not (tmp_path / "o").exists()


def test_compare_logits_counts_ties_within_tolerance():
    import numpy as np

    from export.verify import compare_logits

    reference = [np.array([[1.0, 0.995, 0.0], [0.0, 2.0, 1.0]], dtype=np.float32)]
    candidate = [np.array([[0.99, 1.0, 0.0], [0.0, 2.0, 1.0]], dtype=np.float32)]  # near-tie flipped at row 0
    stats = compare_logits(reference, candidate)
    assert stats["top1_agreement"] == 0.5 and stats["top1_agreement_ties"] == 1.0
    assert stats["max_abs_diff"] == pytest.approx(0.01) and stats["kld_mean"] > 0
    far = [np.array([[0.0, 0.0, 1.0], [0.0, 2.0, 1.0]], dtype=np.float32)]  # a real disagreement at row 0
    assert compare_logits(reference, far)["top1_agreement_ties"] == 0.5


def test_base_named_by_a_4bit_adapter_is_downloaded_in_16_bit(tmp_path, monkeypatch, tiny_model_dir):
    """A real user's adapter names its Hub base; the Hub is the one thing mocked, at snapshot_download."""
    import huggingface_hub

    from export.config import ExportConfig
    from export.errors import ExportError
    from export.pipeline import default_name, resolve_base

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 16, "lora_alpha": 16, "target_modules": ["q_proj"],
         "base_model_name_or_path": "unsloth/Llama-3.2-1B-Instruct-unsloth-bnb-4bit"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    name, folder = resolve_base(ExportConfig(adapter=str(adapter)), run=None)
    assert name == "unsloth/Llama-3.2-1B-Instruct" and folder == tiny_model_dir
    assert calls == [("unsloth/Llama-3.2-1B-Instruct",
                      {"allow_patterns": ["*.safetensors", "*.json", "*.jinja", "tokenizer*"]})]
    assert default_name(name) == "Llama-3.2-1B-Instruct-FineTome"

    def offline(repo_id, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ExportError) as caught:
        resolve_base(ExportConfig(adapter=str(adapter)), run=None)
    assert str(caught.value).count("\n") == 0 and "could not download base model" in str(caught.value)
