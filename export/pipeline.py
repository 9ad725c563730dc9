"""The export run: merge -> F16 GGUF -> quantize -> verify -> report + model card -> push.

Each stage skips itself when its output is already complete (`--force` redoes it); every file is written under a
temporary name and renamed when complete; the report is written only when every check has run.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from common.files import remove_stale_temporaries, sha256_file, write_text_atomic
from common.llama_runtime import LlamaSetupError, extra_buffers
from common.log import stage_logger
from common.machine import usable_cpus
from train.summary import RunSummary, read_run_summary
from train.tiny import is_builtin

from . import gguf, probes, verify
from .config import ExportConfig
from .errors import ExportError
from .imatrix import ensure_imatrix, imatrix_file_name, quantize_with_imatrix

MERGED = "merged-16bit"


log = stage_logger("export").info


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def resolve_base(config: ExportConfig, run: RunSummary | None) -> tuple[str, Path]:
    """(the base's name for the card, a local folder holding its 16-bit safetensors)."""
    from .merge import base_model_name, to_16bit_name

    name = to_16bit_name(config.base) if config.base else base_model_name(config.adapter_dir)
    if run is not None and run.trained_on_builtin and not config.base:
        # The offline tiny model: rebuilt (deterministically) if its cache folder was removed.
        from train.tiny import ensure_tiny_model

        return run.model_name, ensure_tiny_model() if run.seed is None else ensure_tiny_model(run.seed)
    local = Path(name).expanduser()
    if local.is_dir():
        return name, local
    if local.is_absolute() or name.startswith((".", "~")):
        raise ExportError(f"base model folder {name!r} not found; pass --base with the base model's folder or Hub id")
    from huggingface_hub import snapshot_download

    log(f"base: downloading {name} (safetensors, config, tokenizer) from the Hub")
    try:
        folder = snapshot_download(name, allow_patterns=["*.safetensors", "*.json", "*.jinja", "tokenizer*"])
    except Exception as e:  # offline, gated, missing: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"could not download base model {name!r} from the Hub ({first}); "
                          "log in with `hf auth login` for gated models, or pass --base with a local folder") from e
    return name, Path(folder)


def default_name(base_name: str) -> str:
    """File-name stem: `<base>-FineTome`.

    >>> default_name("unsloth/Llama-3.2-1B-Instruct")
    'Llama-3.2-1B-Instruct-FineTome'
    >>> default_name("builtin:tiny-llama-3.2")
    'Tiny-Llama-3.2-FineTome'
    """
    if is_builtin(base_name):
        return "Tiny-Llama-3.2-FineTome"
    return f"{Path(base_name.rstrip('/')).name}-FineTome"


def check_disk(out_dir: Path, base_dir: Path, quants: list[str]) -> None:
    """Merged 16-bit copy + F16 GGUF + each quant (at most ~0.55 of F16 each), with a 10% margin."""
    base_bytes = _folder_bytes(base_dir)
    sixteen_bit = base_bytes // 2 if _is_fp32(base_dir) else base_bytes
    need = int((2 * sixteen_bit + sum(0.55 * sixteen_bit for q in quants if q not in ("f16", "bf16"))) * 1.1)
    out_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise ExportError(f"not enough disk in {out_dir}: about {need / 2**30:.1f} GiB needed, "
                          f"{free / 2**30:.1f} GiB free; free some space or choose another --out")


def _is_fp32(base_dir: Path) -> bool:
    try:
        config = json.loads((base_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return config.get("dtype", config.get("torch_dtype")) == "float32"


def _file_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _report_is_current(report_path: Path, files: list[Path], adapter_sha: str,
                       imatrix_wanted: dict | None = None) -> dict | None:
    """The previous report, when it covers exactly these files, unchanged, for this adapter, made with the importance
    matrix asked for now (or none), and all passed."""
    try:
        report = json.loads(report_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    stamps = report.get("file_stamps", {})
    current = all(f.exists() and stamps.get(f.name) == _file_stamp(f) for f in files)
    if current and set(stamps) == {f.name for f in files} and report.get("adapter_sha256") == adapter_sha \
            and report.get("passed") and _same_imatrix(report.get("imatrix"), imatrix_wanted):
        return report
    return None


def _imatrix_wanted(config: ExportConfig, quants: list[str]) -> dict | None:
    """What the importance matrix of this export must be (None: no quant of this export uses one)."""
    if not config.imatrix or not any(gguf.quant_type(q).imatrix for q in quants):
        return None
    if config.imatrix == "auto":
        return {"source": "training conversations", "max_tokens": config.imatrix_tokens}
    return {"source": "given", "sha256": sha256_file(Path(config.imatrix).expanduser())}


def _same_imatrix(recorded: dict | None, wanted: dict | None) -> bool:
    if recorded is None or wanted is None:
        return recorded is wanted
    if wanted["source"] == "given":
        return recorded.get("source") == "given" and recorded.get("sha256") == wanted["sha256"]
    return recorded.get("source") == wanted["source"] and \
        (recorded.get("settings") or {}).get("max_tokens") == wanted["max_tokens"]


def run(config: ExportConfig, client=None) -> dict:
    """The whole export. `client` is an HfApi-like object for --push (tests inject a recorder)."""
    started = time.perf_counter()
    if config.push:  # the token, its write access and the namespaces: checked with the Hub before any work
        from huggingface_hub import HfApi

        from .hub import check_push_access, merged_repo_id_for, resolve_token

        token = resolve_token()  # never printed
        client = client or HfApi(token=token)
        repos = [config.repo_id] + ([config.merged_repo_id or merged_repo_id_for(config.repo_id)]
                                    if config.push_merged else [])
        log(f"push: the Hub accepts the token of {check_push_access(client, repos)!r} for {', '.join(repos)}")
    try:
        log(f"runtime: {extra_buffers().describe()}")  # the path every GGUF is decoded with below, and why
    except LlamaSetupError as error:
        raise ExportError(str(error)) from None
    out_dir = config.out_dir
    run_info = read_run_summary(config.adapter_dir.parent)  # None when the adapter was exported from elsewhere
    base_name, base_dir = resolve_base(config, run_info)
    name = config.name or default_name(base_name)
    quants = list(dict.fromkeys(config.quant))  # de-duplicated, in order
    check_disk(out_dir, base_dir, quants)
    for stale in remove_stale_temporaries(out_dir):
        log(f"cleanup: removed {stale.name} left by an interrupted run")
    adapter_sha = sha256_file(config.adapter_dir / "adapter_model.safetensors")
    outputs = [out_dir / gguf.gguf_file_name(name, q) for q in quants]
    report_path = out_dir / "report.json"
    imatrix_wanted = _imatrix_wanted(config, quants)
    # The importance matrix is an output too: stamped, pushed beside the GGUFs, described in the report and card.
    stamped = outputs + ([out_dir / imatrix_file_name(name)] if imatrix_wanted else [])

    report = None if config.force else _report_is_current(report_path, stamped, adapter_sha, imatrix_wanted)
    if report is not None:
        log(f"export: {', '.join(p.name for p in outputs)} are complete and verified (report.json); "
            "nothing to do (--force redoes everything)")
    else:
        report = _build(config, run_info, base_name, base_dir, name, quants, outputs, adapter_sha, imatrix_wanted)
        report["seconds"] = round(time.perf_counter() - started, 1)
        write_text_atomic(report_path, json.dumps(report, indent=2))

    from .card import render_model_card

    card = render_model_card({"name": name, "repo_id": config.repo_id, "base_model": base_name,
                              "files": report["files"], "run": run_info, "report": report, "space_url": None})
    write_text_atomic(out_dir / "README.md", card)
    if not report["passed"]:
        failed = [c["name"] for c in report["checks"] if not c["passed"]]
        raise ExportError(f"verification failed ({'; '.join(failed)}); see {report_path}")

    log("")
    for p in outputs:
        log(f"export: {p} ({_size(p)})")
    log(f"export: report {report_path}, model card {out_dir / 'README.md'}, merged model {out_dir / MERGED}")
    parity = report["logits_f16_vs_merged"]
    log(f"export: f16 vs merged top-1 {parity['top1_agreement_ties']:.2%} (exact {parity['top1_agreement']:.2%}); "
        + "; ".join(
        f"{q} KLD {s['kld_mean']:.5f}, top-1 {s['top1_agreement']:.2%}" for q, s in report["quantization"].items()))

    probed = report.get("probes") or {}
    if probed.get("mode", "off") != "off":
        log(f"export: behaviour probes ({probed['mode']}, {probed['prompts']} prompts): " + "; ".join(
            f"{q} {s['identical']}/{s['probes']} identical to merged"
            + (f", {s['taught']}/{s['probes']} taught answers" if "taught" in s else "")
            for q, s in probed["per_quant"].items()))

    if config.push:
        from .hub import push_export

        urls = push_export(client, config.repo_id, stamped, card, config.private,
                           merged_dir=out_dir / MERGED if config.push_merged else None,
                           merged_repo_id=config.merged_repo_id)
        report["pushed"] = urls
        write_text_atomic(report_path, json.dumps(report, indent=2))
        log(f"push: {urls}")
    return report


def _reusable(path: Path, quant: str, tokenizer, imatrix: Path | None = None) -> bool:
    """Whether a GGUF already under its final name is a complete one of this quant, so a rerun may keep it. A file
    that llama.cpp cannot load (not a GGUF, truncated, copied in by hand) is said and made again, never trusted; nor
    is one made with an importance matrix when none is wanted now, or without (or with another) when one is."""
    if not path.exists():
        return False
    problem = verify.load_problem(path)
    if problem is not None:
        log(f"export: {path.name} is not a loadable GGUF ({problem}); making it again")
        return False
    if verify.imatrix_of(path) != (imatrix.name if imatrix is not None else None):
        return False
    return all(check.passed for check in verify.check_metadata(path, quant, tokenizer))


def _build(config: ExportConfig, run_info: RunSummary | None, base_name: str, base_dir: Path, name: str,
           quants: list[str], outputs: list[Path], adapter_sha: str, imatrix_wanted: dict | None = None) -> dict:
    """Merge, convert, quantize and verify; returns the report (the caller writes it)."""
    out_dir = config.out_dir

    # 1. merge
    from .merge import MANIFEST, merge_lora_streaming, merged_is_complete

    merged = out_dir / MERGED
    merged_ok = not config.force and merged_is_complete(merged) and \
        json.loads((merged / MANIFEST).read_text()).get("adapter_sha256") == adapter_sha
    if merged_ok:
        log(f"merge: {merged} is complete, skipping")
    else:
        log(f"merge: {base_name} + {config.adapter_dir} -> {merged} ({config.merge_dtype}, streaming)")
        merge_lora_streaming(base_dir, config.adapter_dir, merged, dtype=config.merge_dtype)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)

    # 2. F16 GGUF (the conversion target every quant starts from)
    f16 = out_dir / gguf.gguf_file_name(name, "f16")
    # Outputs made from an earlier merge are reused only while that merge is still the current one.
    if merged_ok and _reusable(f16, "f16", tokenizer):
        log(f"convert: {f16.name} is complete, skipping")
    else:
        converter = gguf.ensure_converter(Path(config.llama_cpp_dir) if config.llama_cpp_dir else None, log=log)
        log(f"convert: {merged} -> {f16.name} with llama.cpp's convert_hf_to_gguf.py ({converter})")
        gguf.convert_to_gguf(merged, f16, converter, name, "f16", log=log)

    # 3. the importance matrix (--imatrix), then quantize
    imatrix, imatrix_report, imatrix_reused = None, None, False
    if imatrix_wanted:
        imatrix, imatrix_report = ensure_imatrix(
            config.imatrix, f16=f16, out_dir=out_dir, model_name=name, run_info=run_info, tokenizer=tokenizer,
            max_tokens=config.imatrix_tokens, reuse=merged_ok and not config.force,
            threads=config.threads or usable_cpus(), log=log)
        imatrix_reused = imatrix_report.pop("reused", False)
        imatrix_report = {**imatrix_report, "sha256": sha256_file(imatrix),
                          "quants": [q for q in quants if gguf.quant_type(q).imatrix]}
    for quant, output in zip(quants, outputs):
        if quant == "f16":
            continue
        uses_imatrix = imatrix if imatrix is not None and gguf.quant_type(quant).imatrix else None
        # A matrix made now is a new one: the quants made with the old one are made again.
        if merged_ok and (uses_imatrix is None or imatrix_reused) and _reusable(output, quant, tokenizer, uses_imatrix):
            log(f"quantize: {output.name} is complete, skipping")
            continue
        if uses_imatrix is not None:
            threads = config.threads or usable_cpus()
            log(f"quantize: {f16.name} -> {output.name} with the importance matrix {uses_imatrix.name} "
                f"(llama-quantize, {threads} threads)")
            quant_started = time.perf_counter()
            quantize_with_imatrix(f16, output, quant, uses_imatrix, threads=threads, log=log)
            log(f"quantize: wrote {output.name} ({_size(output)}) in {time.perf_counter() - quant_started:.1f} s")
            continue
        if quant == "bf16":
            converter = gguf.ensure_converter(Path(config.llama_cpp_dir) if config.llama_cpp_dir else None, log=log)
            gguf.convert_to_gguf(merged, output, converter, name, "bf16", log=log)
            continue
        threads = config.threads or usable_cpus()
        log(f"quantize: {f16.name} -> {output.name} ({threads} threads)")
        quant_started = time.perf_counter()
        gguf.quantize(f16, output, quant, threads=threads)
        log(f"quantize: wrote {output.name} ({_size(output)}) in {time.perf_counter() - quant_started:.1f} s")

    # 4. verify
    log("verify: metadata, tokenizer, chat template, logits, quantization error, chat")
    checks: list[verify.Check] = []
    for quant, output in zip(quants, outputs):
        checks += verify.check_metadata(output, quant, tokenizer)
        if imatrix is not None and gguf.quant_type(quant).imatrix:
            checks.append(verify.check_imatrix_recorded(output, imatrix))
    checks.append(verify.check_tokenizer(outputs[0], tokenizer))
    checks.append(verify.check_template(outputs[0], tokenizer))
    sequences = verify.heldout_token_ids(tokenizer)
    probe_mode, probe_list = probes.probe_set(run_info, config.probes) if config.probes else ("off", [])
    model = verify.load_merged(merged)  # loaded once, for the logits and the probes' reference answers
    reference = verify.model_logits(model, sequences)
    answers = {"merged": probes.merged_answers(model, tokenizer, probe_list, config.probe_tokens)} if probe_list \
        else {}
    del model
    gc.collect()
    f16_logits = verify.gguf_logits(f16, sequences)
    f16_stats = verify.compare_logits(reference, f16_logits)
    checks.append(verify.check_f16_logits(f16_stats))
    quant_stats = {}
    for quant, output in zip(quants, outputs):
        if quant == "f16":
            continue  # checked against the merged model above
        stats = verify.compare_logits(f16_logits, verify.gguf_logits(output, sequences))
        quant_stats[quant] = stats
        checks.append(verify.check_quant_logits(output.name, quant, stats))
    for output in outputs:
        checks.append(verify.check_chat(output))
    probe_report, probe_checks = _probe(probe_mode, probe_list, answers, f16, quants, outputs, tokenizer,
                                        config.probe_tokens)
    checks += probe_checks

    for check in checks:
        mark = "ok  " if check.passed else "FAIL"
        log(f"  {mark} {check.name}: {check.value}" + (f" (needs {check.threshold})" if check.threshold else ""))

    if "f16" not in quants and not config.keep_f16:
        f16.unlink(missing_ok=True)
    return {
        "name": name,
        "base_model": base_name,
        "adapter": str(config.adapter_dir),
        "adapter_sha256": adapter_sha,
        "llama_cpp_python": gguf.llama_cpp_version(),
        "llama_cpp_extra_buffers": asdict(extra_buffers()),
        "files": [{"name": p.name, "quant": q, "size_bytes": p.stat().st_size} for q, p in zip(quants, outputs)],
        "file_stamps": {p.name: _file_stamp(p) for p in outputs + ([imatrix] if imatrix is not None else [])},
        "checks": [c.to_dict() for c in checks],
        "logits_f16_vs_merged": f16_stats,
        "quantization": quant_stats,
        "probes": probe_report,
        "imatrix": imatrix_report,
        "notes": report_notes(run_info),
        "passed": all(c.passed for c in checks),
    }


def _probe(mode: str, probe_list: list, answers: dict, f16: Path, quants: list[str], outputs: list[Path],
           tokenizer, max_tokens: int) -> tuple[dict, list[verify.Check]]:
    """Greedy answers of the f16 GGUF and each output against the merged model's; taught runs are checked."""
    if not probe_list:
        return {"mode": "off"}, []
    files = {"f16": f16, **{q: p for q, p in zip(quants, outputs)}}
    log(f"probes: greedy answers to {len(probe_list)} {mode} prompts, {max_tokens} tokens at most, "
        f"merged model vs {', '.join(files)}")
    per_quant, checks = {}, []
    for quant, path in files.items():
        answers[quant] = probes.gguf_answers(path, probe_list, max_tokens)
        per_quant[quant] = probes.compare_answers(tokenizer, probe_list, answers["merged"], answers[quant])
    report = {"mode": mode, "prompts": len(probe_list), "max_tokens": max_tokens, "per_quant": per_quant,
              "answers": probes.answers_table(tokenizer, probe_list, answers)}
    if mode == "taught":
        merged_taught = sum(probes.answer_text(tokenizer, a) == p.expected
                            for p, a in zip(probe_list, answers["merged"]))
        report["merged_taught"] = merged_taught
        total = len(probe_list)
        checks.append(verify.Check("taught answers: merged model (transformers)", merged_taught == total,
                                   f"{merged_taught}/{total}", f"{total}/{total}", "greedy, word for word"))
        for quant, stats in per_quant.items():
            bound = gguf.quant_type(quant).taught_min_share  # every type has one: none is only reported
            checks.append(verify.Check(
                f"taught answers: {files[quant].name}", stats["taught"] >= bound * total,
                f"{stats['taught']}/{total}", f">= {bound:.0%} of {total}",
                f"identical to the merged model's first {max_tokens} tokens: {stats['identical']}/{total}"))
    return report, checks


def report_notes(run_info: RunSummary | None) -> list[str]:
    notes = []
    random_tiny = run_info is not None and run_info.trained_on_builtin
    if random_tiny and probes.taught_file(run_info) is not None:
        notes.append("This is the offline tiny model, taught the five answers of train/data/taught.jsonl from random "
                     "weights (the demo preset): the taught-answer checks above are what it learned; on any other "
                     "text its next-token distributions are nearly uniform, so KL divergences are tiny and top-1 "
                     "agreement between quantizations is low (near-ties flip), reported, not checked.")
    elif random_tiny:
        notes.append("This is the offline tiny model (random weights, a few training steps): its next-token "
                     "distributions are nearly uniform, so KL divergences are tiny and top-1 agreement between "
                     "quantizations is low (near-ties flip). The same KLD limits apply; top-1 agreement of quantized "
                     "files is reported, not checked.")
    return notes
