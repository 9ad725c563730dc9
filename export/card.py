"""The model card (README.md) of a GGUF repo: the YAML metadata the Hub indexes, then what the model is, its files,
how to run it, how it was trained and how it was verified.

`render_model_card(info)` is pure and deterministic (no timestamps, no I/O): export/to_gguf.py gathers `info` and
the push commits the returned text as README.md, so a test can compare the pushed card byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import yaml

from common.hub import looks_like_repo_id
from common.llama3 import DATASET

from .gguf import QUANT_TYPES

LICENSE = "llama3.2"  # the Hub's license id for the Llama 3.2 Community License
TAGS = ["gguf", "llama-cpp", "llama-3.2", "conversational", "text-generation", "lora", "finetome"]
# quantized_by when the card is rendered for a local export that has no repo (no Hub user to credit).
DEFAULT_QUANTIZER = "finetome-pipeline"
# Unquantized GGUF types: the usage example points at the first real quant instead when there is one.
UNQUANTIZED = {"f32"} | {name for name, kind in QUANT_TYPES.items() if not kind.quantized}
# Context window of the usage example: Llama-3.2 handles 131,072 tokens, but the KV cache grows with n_ctx and
# 4,096 keeps a 1B/3B model within a free CPU Space's RAM.
EXAMPLE_CONTEXT = 4096
LICENSE_URL = "https://www.llama.com/llama3_2/license/"
USE_POLICY_URL = "https://www.llama.com/llama3_2/use-policy/"


def format_size(size_bytes: int) -> str:
    """Decimal units, as the Hub shows file sizes.

    >>> format_size(807_694_464), format_size(2_019_377_440)
    ('807.7 MB', '2.02 GB')
    """
    if size_bytes < 1e9:
        return f"{size_bytes / 1e6:.1f} MB"
    return f"{size_bytes / 1e9:.2f} GB"


def quant_suffix(file_name: str) -> str:
    """The quant part of a GGUF file name: what llama-cpp-python's filename glob and llama-cli's `-hf repo:TAG` match.

    >>> quant_suffix("Llama-3.2-1B-Instruct-FineTome-Q4_K_M.gguf"), quant_suffix("model.Q8_0.gguf")
    ('Q4_K_M', 'Q8_0')
    """
    stem = file_name.removesuffix(".gguf")
    return re.split(r"[-.]", stem)[-1]


def format_duration(seconds: float) -> str:
    """
    >>> format_duration(42), format_duration(444.0), format_duration(93_600)
    ('42 s', '7.4 min', '26.0 h')
    """
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _cell(value) -> str:
    """A value as one Markdown table cell: floats shortened, pipes escaped, newlines flattened."""
    if value is None:
        return "—"
    if isinstance(value, float):
        value = f"{value:.4g}"
    return " ".join(str(value).split()).replace("|", "\\|")


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _primary_file(files: list[dict]) -> dict:
    """The file the usage example loads: the first quantized one, else the first one."""
    return next((file for file in files if file["quant"].lower() not in UNQUANTIZED), files[0])


def front_matter(info: dict) -> dict:
    """The card's YAML metadata, in the order it is written."""
    run = info.get("run") or {}
    repo_id = info.get("repo_id")
    metadata = {}
    # The Hub rejects a base_model that is not a "namespace/name" model id (a local folder, the built-in tiny model).
    if looks_like_repo_id(info["base_model"]):
        metadata["base_model"] = info["base_model"]
        metadata["base_model_relation"] = "quantized"
    metadata.update({
        "datasets": [DATASET],
        "language": ["en"],
        "license": LICENSE,
        "pipeline_tag": "text-generation",
        "quantized_by": repo_id.split("/")[0] if repo_id else DEFAULT_QUANTIZER,
        "tags": TAGS + (["unsloth"] if run.get("backend") == "unsloth" else []),
    })
    return metadata


def _introduction(info: dict) -> str:
    base = info["base_model"]
    base_link = f"[{base}](https://huggingface.co/{base})" if looks_like_repo_id(base) else f"`{base}`"
    return (f"# {info['name']}\n\n"
            f"{base_link} fine-tuned with LoRA on [FineTome-100k](https://huggingface.co/datasets/{DATASET}), "
            "then the adapter merged into the 16-bit weights, converted to GGUF and quantized with llama.cpp's own "
            "tools. The GGUF carries the Llama-3.2 chat template, so chat front ends format conversations correctly "
            "without extra settings.")


def _files_section(files: list[dict], imatrix: dict | None = None) -> str:
    with_matrix = set((imatrix or {}).get("quants", []))
    rows = [(f"`{file['name']}`", file["quant"].upper(), format_size(file["size_bytes"]),
             _quant_label(file["quant"]) + (" (importance matrix)" if file["quant"] in with_matrix else ""))
            for file in files]
    section = "## Files\n\n" + _table(("file", "quant type", "size", "what it is"), rows)
    if imatrix:
        section += "\n\n" + _imatrix_paragraph(imatrix)
    return section


def _quant_label(quant: str) -> str:
    kind = QUANT_TYPES.get(quant.lower())
    return kind.label if kind else ""


def _imatrix_paragraph(imatrix: dict) -> str:
    """Where the importance matrix came from and what it took (report.json's "imatrix")."""
    quants = ", ".join(q.upper() for q in imatrix.get("quants", []))
    if imatrix.get("source") == "given":
        origin = "a given importance matrix"
    else:
        origin = (f"an importance matrix computed from {_formatted(imatrix.get('conversations'), ',')} of the "
                  f"model's own training conversations ({imatrix.get('dataset')}, held-out split excluded), "
                  "rendered in the chat template used in training")
    figures = [f"{_formatted(imatrix.get('tokens'), ',')} tokens" if imatrix.get("tokens") else None,
               f"{imatrix.get('chunks')} chunks of {imatrix.get('chunk_tokens')}" if imatrix.get("chunks") else None,
               format_duration(imatrix["seconds"]) if imatrix.get("seconds") is not None else None]
    figures = ", ".join(f for f in figures if f)
    return (f"{quants} quantized with llama.cpp's `llama-quantize --imatrix` using {origin}"
            + (f" ({figures})" if figures else "") + f"; the matrix is `{imatrix['file']}` in this repo.")


def _usage_section(info: dict, primary: dict) -> str:
    repo_id, file_name = info.get("repo_id"), primary["name"]
    suffix = quant_suffix(file_name)
    if repo_id:
        load = f'llm = Llama.from_pretrained(repo_id="{repo_id}", filename="*{suffix}.gguf", n_ctx={EXAMPLE_CONTEXT})'
        cli = f"llama-cli -hf {repo_id}:{suffix}"
        cli_note = "downloads the file and opens a chat in the terminal"
    else:
        load = f'llm = Llama(model_path="{file_name}", n_ctx={EXAMPLE_CONTEXT})'
        cli = f"llama-cli -m {file_name}"
        cli_note = "opens a chat in the terminal"
    snippet = ("from llama_cpp import Llama\n\n"
               f"{load}\n"
               'reply = llm.create_chat_completion(messages=[{"role": "user", "content": '
               '"Explain LoRA fine-tuning in two sentences."}])\n'
               'print(reply["choices"][0]["message"]["content"])')
    return ("## Usage\n\n"
            "With [llama-cpp-python](https://github.com/abetlen/llama-cpp-python) (`pip install llama-cpp-python`), "
            "on a CPU:\n\n"
            f"```python\n{snippet}\n```\n\n"
            f"With the llama.cpp CLI, `{cli}` {cli_note}.\n\n"
            + _space_paragraph(info))


def _space_paragraph(info: dict) -> str:
    if info.get("space_url"):
        return (f"Or chat with it in the browser in the project's Gradio Space: {info['space_url']} "
                "(it runs on a free CPU).")
    repo_id = info.get("repo_id") or "USER/NAME-GGUF"
    # The Space compares a 1B and a 3B model side by side; each has its own flag.
    size_flag = "--model-3b" if re.search(r"\b3B\b", info["base_model"], re.IGNORECASE) else "--model-1b"
    pushed_first = "" if info.get("repo_id") else ", once this GGUF is pushed to the Hub (`--push`)"
    return ("To chat with it in a browser, deploy the project's Gradio Space on a free CPU" + pushed_first + ":\n\n"
            f"```bash\npython scripts/deploy_space.py --space-id USER/NAME {size_flag} {repo_id}\n```")


def _join(separator: str, *values) -> str | None:
    """The values joined, or None when any is missing (so a row with a missing value is left out)."""
    return None if any(value is None for value in values) else separator.join(str(value) for value in values)


def _formatted(value, format_spec: str) -> str | None:
    return None if value is None else format(value, format_spec)


def _training_rows(run: Mapping) -> list[tuple[str, str]]:
    config = run.get("config") or {}
    data = run.get("data") or {}
    versions = run.get("versions") or {}
    batch, accum = config.get("batch_size"), config.get("grad_accum")
    rows = [
        ("base model", config.get("model_name")),
        ("dataset", config.get("dataset")),
        ("training conversations", _formatted(data.get("train"), ",")),
        ("minimum FineTome score", config.get("min_score")),
        ("backend / device / dtype", _join(" / ", run.get("backend"), run.get("device"), run.get("dtype"))),
        ("optimizer steps", run.get("steps")),
        ("LoRA rank / alpha", _join(" / ", config.get("lora_r"), config.get("lora_alpha"))),
        ("learning rate", _formatted(config.get("learning_rate"), "g")),
        ("batch", None if None in (batch, accum) else
         f"{batch} × {accum} gradient accumulation = {batch * accum} conversations per step"),
        ("max sequence length", config.get("max_seq_length")),
        ("seed", config.get("seed")),
        ("final train loss", run.get("train_loss")),
        ("final eval loss", run.get("eval_loss")),
        ("tokens seen", _formatted(run.get("tokens_seen"), ",")),
        ("throughput", _join(" ", _formatted(run.get("tokens_per_second"), ",.0f"), "tokens/s")),
        ("training time", None if run.get("train_seconds") is None else format_duration(run["train_seconds"])),
        ("libraries", ", ".join(f"{name} {version}" for name, version in versions.items()) or None),
    ]
    return [(name, value) for name, value in rows + _dpo_rows(run) if value is not None]


def _dpo_rows(run: Mapping) -> list[tuple[str, str]]:
    """A DPO run's provenance (train/dpo.py): the SFT run it started from, its pairs and votes, the held-out figures."""
    if run.get("stage") != "dpo":
        return []
    sft, pairs, heldout = run.get("sft") or {}, run.get("pairs") or {}, run.get("heldout") or {}
    counts, split = pairs.get("counts") or {}, pairs.get("split") or {}
    before, after = heldout.get("before") or {}, heldout.get("after") or {}
    return [
        ("stage", "DPO (preference tuning) of an SFT run's adapter; this adapter carries both"),
        ("SFT run", _join("", sft.get("adapter"), f" ({sft.get('steps')} steps on {sft.get('dataset')})")),
        ("preference pairs", _join("", ", ".join(pairs.get("sources") or []) or None,
                                   f": {counts.get('pairs')} pairs ({split.get('train')} train / {split.get('eval')} "
                                   f"eval / {split.get('heldout')} held out)")),
        ("votes", None if not counts.get("votes") else
         f"{counts['votes']} ({counts.get('ties')} ties, {counts.get('both_bad')} both bad skipped; "
         f"{counts.get('duplicates')} duplicates removed)"),
        ("DPO beta / loss", _join(" / ", (run.get("config") or {}).get("beta"), (run.get("config") or {}).get("loss_type"))),
        ("held-out preference accuracy", None if not after else
         f"{before.get('preference_accuracy'):.2f} (SFT) → {after.get('preference_accuracy'):.2f} (DPO), "
         f"{heldout.get('pairs')} pairs"),
        ("held-out reward margin", None if not after else
         f"{after.get('reward_margin'):+.3f} (reward accuracy {after.get('reward_accuracy'):.2f})"),
    ]


def _training_section(run: Mapping | None) -> str:
    if run is None:
        return ("## Training settings\n\n"
                "The training settings are unknown: no run.json was found for this model.")
    return ("## Training settings\n\n"
            "From the run's run.json (written by train/run.py):\n\n"
            + _table(("setting", "value"), _training_rows(run)))


def _verification_section(report: dict) -> str:
    checks = report.get("checks", [])
    failed = sum(not check["passed"] for check in checks)
    if not checks:
        summary = "No verification checks were recorded."
    elif failed:
        summary = f"{failed} of {len(checks)} checks failed."
    else:
        summary = f"All {len(checks)} checks passed."
    parts = ["## Verification", "Checks run on the exported GGUF files. " + summary]
    if checks:
        rows = [(check["name"], "✅" if check["passed"] else "❌", check["value"], check.get("threshold"),
                 check.get("detail") or "") for check in checks]
        parts.append(_table(("check", "result", "value", "threshold", "detail"), rows))
    probes = _probes_part(report.get("probes") or {})
    if probes:
        parts.append(probes)
    notes = report.get("notes", [])
    if notes:
        parts.append("\n".join(f"- {' '.join(str(note).split())}" for note in notes))
    return "\n\n".join(parts)


def _probes_part(probes: dict) -> str | None:
    """The behaviour probes: per file, how many greedy answers equal the merged model's, and the first divergence."""
    if probes.get("mode", "off") == "off":
        return None
    taught = probes["mode"] == "taught"
    what = ("the questions the model was taught (each answer also compared with the taught one; checked above)"
            if taught else "held-out prompts (a reported figure, not a check)")
    rows = []
    for quant, stats in probes["per_quant"].items():
        divergence = stats.get("first_divergence")
        where = (f"{divergence['prompt']!r}, token {divergence['token']}: {divergence['merged']!r} vs "
                 f"{divergence['gguf']!r}" if divergence else "none")
        row = (quant, f"{stats['identical']}/{stats['probes']}", where)
        rows.append(row + ((f"{stats['taught']}/{stats['probes']}",) if taught else ()))
    header = ("file", "identical to merged", "first divergence") + (("taught answers",) if taught else ())
    return (f"**Behaviour probes.** Greedy answers (at most {probes['max_tokens']} tokens) of the merged 16-bit "
            f"model (transformers) and of each GGUF (llama.cpp, the GGUF's own chat template) to {probes['prompts']} "
            f"{what}:\n\n" + _table(header, rows))


def _limitations_section() -> str:
    return ("## Limitations\n\n"
            "A small model: it makes factual mistakes and loses track in long reasoning, and quantization costs a "
            "little quality on top. It inherits Llama-3.2's license "
            f"([Llama 3.2 Community License]({LICENSE_URL})) and [Acceptable Use Policy]({USE_POLICY_URL}).")


def render_model_card(info: dict) -> str:
    """README.md for a GGUF repo.

    info: name, repo_id (or None), base_model, files ([{"name", "quant", "size_bytes"}], at least one),
    run (the run's run.json, a train.summary.RunSummary or a plain mapping, or None), report ({"checks": [...], "notes": [...]}), space_url (or None).

    >>> card = render_model_card({"name": "Demo-GGUF", "repo_id": "alice/Demo-GGUF",
    ...     "base_model": "unsloth/Llama-3.2-1B-Instruct", "run": None, "report": {"checks": []}, "space_url": None,
    ...     "files": [{"name": "Demo-Q4_K_M.gguf", "quant": "q4_k_m", "size_bytes": 807_694_464}]})
    >>> card.splitlines()[0], 'filename="*Q4_K_M.gguf"' in card, "| `Demo-Q4_K_M.gguf` | Q4_K_M | 807.7 MB |" in card
    ('---', True, True)
    """
    if not info["files"]:
        raise ValueError("render_model_card needs at least one GGUF file in info['files']")
    metadata = yaml.safe_dump(front_matter(info), sort_keys=False, allow_unicode=True)
    sections = [
        _introduction(info),
        _files_section(info["files"], (info.get("report") or {}).get("imatrix")),
        _usage_section(info, _primary_file(info["files"])),
        _training_section(info.get("run")),
        _verification_section(info["report"]),
        _limitations_section(),
    ]
    return f"---\n{metadata}---\n\n" + "\n\n".join(sections) + "\n"
