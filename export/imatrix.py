"""Importance-matrix quants: calibrate on the fine-tune's own training conversations, quantize with llama.cpp's tools.

    python export/to_gguf.py --adapter outputs/tiny/adapter --imatrix            # calibrate on the run's own data
    python export/to_gguf.py --adapter DIR --imatrix other-imatrix.gguf          # or use a given matrix

The Python binding cannot hand `llama_model_quantize` an importance matrix (a C++ map pointer), so these quants go
through llama.cpp's own `llama-imatrix` and `llama-quantize`, built once per machine (common/llama_tools.py).

Calibration text: the training run's own conversations (its dataset, seed, held-out split and filters from run.json,
so the held-out conversations stay out), each rendered with exactly the chat template the training used
(train.conversations.render: the tokenizer's template, the fixed date), concatenated, up to `--imatrix-tokens` tokens;
llama-imatrix reads it with --parse-special, so the template's markers are the real special tokens the model saw.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import time
from pathlib import Path

from common.files import temporary_path, write_text_atomic
from common.llama_runtime import LlamaSetupError
from common.llama_tools import llama_tool, safe_path_args
from common.machine import usable_cpus
from train.summary import RunSummary

from .errors import ExportError
from .gguf import _dies_with as dies_with, quant_type

CHUNK_TOKENS = 512  # llama-imatrix's default context per chunk; the scoreboard's matrices use it too
WITHOUT_TOOLS = "; or export without --imatrix (static quants need no compiled tool)"


def imatrix_file_name(model_name: str) -> str:
    """
    >>> imatrix_file_name("Llama-3.2-1B-Instruct-FineTome")
    'Llama-3.2-1B-Instruct-FineTome-imatrix.gguf'
    """
    return f"{model_name}-imatrix.gguf"


def tool(name: str, log=print) -> Path:
    try:
        return llama_tool(name, log=log, without=WITHOUT_TOOLS)
    except LlamaSetupError as error:
        raise ExportError(str(error)) from None


# ---------------------------------------------------------------------- calibration text
def calibration_conversations(run_info: RunSummary | None, batch: int = 64):
    """The run's training conversations in training order (held-out split excluded), lazily, in batches."""
    split = run_info.data_split if run_info is not None else None
    if split is None:
        found = "" if run_info is None else " with its data split (dataset, seed, eval_samples)"
        raise ExportError(f"--imatrix needs the training run's run.json{found} (next to the adapter) to find its "
                          "training conversations; pass --imatrix FILE with an imatrix.gguf instead")
    from train.conversations import prepare_split

    prepared = prepare_split(split)
    rows = prepared.train_rows
    for start in range(0, len(rows), batch):
        yield from prepared.conversations(rows[start:start + batch])


def calibration_text(conversations, tokenizer, max_tokens: int, min_tokens: int = 2 * CHUNK_TOKENS) -> tuple[str, dict]:
    """Conversations rendered with the training chat template, concatenated up to `max_tokens` tokens; a set too
    small for two chunks (llama-imatrix's minimum) is cycled through again and said so."""
    from train.conversations import render

    pieces, tokens, used, seen = [], 0, 0, []
    for messages in conversations:
        text = render(tokenizer, messages)
        seen.append(text)
        pieces.append(text)
        tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        used += 1
        if tokens >= max_tokens:
            break
    repeated = False
    while seen and tokens < min_tokens:
        for text in seen:
            pieces.append(text)
            tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
            repeated = True
            if tokens >= min_tokens:
                break
    if not pieces:
        raise ExportError("--imatrix: the training run's dataset has no training conversations to calibrate on")
    return "".join(pieces), {"conversations": used, "tokens": tokens, "repeated": repeated}


# ---------------------------------------------------------------------- running the tools
def _run_tool(command: list[str], what: str, log=print) -> str:
    """Run a llama.cpp tool to completion (it dies with the export); its output; one-line ExportError on failure."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace", preexec_fn=dies_with(os.getpid()))
    output, _ = process.communicate()
    if process.returncode != 0:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        error = next((line for line in reversed(lines) if "error" in line.lower() or "failed" in line.lower()),
                     lines[-1] if lines else f"exit status {process.returncode}")
        raise ExportError(f"{what} failed (exit status {process.returncode}): {error}")
    return output


def compute_imatrix(model: Path, text_file: Path, out_file: Path, *, chunks: int, threads: int | None = None,
                    log=print) -> dict:
    """llama-imatrix over `text_file` (special tokens parsed) into `out_file`, atomically; what it computed."""
    binary = tool("llama-imatrix", log)
    temporary = temporary_path(out_file)
    threads = threads or usable_cpus()
    command = [str(binary), "-m", str(model), "-f", str(text_file), "-o", str(temporary), "--output-format", "gguf",
               "--parse-special", "-c", str(CHUNK_TOKENS), "--chunks", str(chunks), "--no-ppl",
               "-t", str(threads), "-tb", str(threads), *safe_path_args()]
    started = time.perf_counter()
    try:
        output = _run_tool(command, f"llama-imatrix on {model.name}", log)
        if not temporary.is_file():
            raise ExportError(f"llama-imatrix on {model.name} wrote no matrix")
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, out_file)
    seconds = round(time.perf_counter() - started, 1)
    computed = re.search(r"computing over (\d+) chunks, n_ctx=(\d+)", output)
    return {"chunks": int(computed.group(1)) if computed else None,
            "chunk_tokens": int(computed.group(2)) if computed else CHUNK_TOKENS, "seconds": seconds}


def quantize_with_imatrix(source: Path, out_file: Path, quant: str, imatrix: Path, threads: int | None = None,
                          log=print) -> Path:
    """llama-quantize --imatrix, atomically (a kill leaves only a temporary name, removed by the rerun)."""
    binary = tool("llama-quantize", log)
    temporary = temporary_path(out_file)
    command = [str(binary), "--imatrix", str(imatrix), str(source), str(temporary), quant_type(quant).suffix,
               str(threads or usable_cpus())]
    try:
        _run_tool(command, f"llama-quantize {source.name} to {quant} with {imatrix.name}", log)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, out_file)
    return out_file


# ---------------------------------------------------------------------- reading an imatrix.gguf
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.at + size > len(self.data):
            raise ValueError("truncated")
        value = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        length = self.take("Q")
        if self.at + length > len(self.data):
            raise ValueError("truncated")
        text = self.data[self.at:self.at + length].decode("utf-8", "replace")
        self.at += length
        return text

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.take("I"), self.take("Q")
            return [self.value(item_kind) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown value type {kind}")
        return self.take(_SCALARS[kind])


def read_imatrix(path: Path) -> dict:
    """The metadata and tensor count of an imatrix.gguf; ValueError when it is not a complete one (wrong magic, not an
    imatrix, truncated: every F32 tensor it lists must lie inside the file)."""
    data = Path(path).read_bytes()
    reader = _Reader(data)
    if data[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    reader.at = 4
    version, tensor_count, kv_count = reader.take("I"), reader.take("Q"), reader.take("Q")
    metadata = {}
    for _ in range(kv_count):
        key = reader.string()
        metadata[key] = reader.value(reader.take("I"))
    if metadata.get("general.type") != "imatrix":
        raise ValueError(f"general.type is {metadata.get('general.type')!r}, not 'imatrix'")
    end = 0
    for _ in range(tensor_count):
        reader.string()
        dims = [reader.take("Q") for _ in range(reader.take("I"))]
        kind, offset = reader.take("I"), reader.take("Q")
        if kind != 0:  # llama-imatrix writes F32 only
            raise ValueError(f"tensor type {kind} is not F32")
        count = 1
        for dim in dims:
            count *= dim
        end = max(end, offset + 4 * count)
    alignment = metadata.get("general.alignment", 32)
    data_start = -(-reader.at // alignment) * alignment
    if tensor_count == 0 or data_start + end > len(data):
        raise ValueError("truncated" if tensor_count else "no tensors")
    return {"version": version, "tensors": tensor_count, "chunk_count": metadata.get("imatrix.chunk_count"),
            "chunk_size": metadata.get("imatrix.chunk_size"), "datasets": metadata.get("imatrix.datasets", [])}


def imatrix_problem(path: Path) -> str | None:
    try:
        read_imatrix(path)
    except (OSError, ValueError, struct.error) as error:
        return str(error) or type(error).__name__
    return None


# ---------------------------------------------------------------------- the stage
def calibration_file(out_dir: Path) -> Path:
    return out_dir / "imatrix-calibration.txt"


def record_path(imatrix: Path) -> Path:
    """The facts of a computed matrix (source, tokens, chunks, time), kept beside it for reruns and the report."""
    return imatrix.with_suffix(".json")


def ensure_imatrix(setting: str, *, f16: Path, out_dir: Path, model_name: str, run_info: RunSummary | None, tokenizer,
                   max_tokens: int, reuse: bool, threads: int | None = None, log=print) -> tuple[Path, dict]:
    """The importance matrix the export quantizes with, and its description for report.json and the card.

    setting "auto": computed from the run's own training conversations (kept and reused while the merge, the
    setting and the file are unchanged); a path: that imatrix.gguf, checked and copied beside the GGUFs."""
    target = out_dir / imatrix_file_name(model_name)
    if setting != "auto":
        given = Path(setting).expanduser()
        if problem := imatrix_problem(given):
            raise ExportError(f"--imatrix {setting!r}: not a complete imatrix.gguf ({problem}); make one with "
                              "llama-imatrix, or pass --imatrix alone to calibrate on the run's own data")
        facts = read_imatrix(given)
        reused = target.is_file() and target.read_bytes() == given.read_bytes()
        if not reused:
            temporary = temporary_path(target)
            temporary.write_bytes(given.read_bytes())
            os.replace(temporary, target)
        chunks, size = facts["chunk_count"], facts["chunk_size"]
        return target, {"source": "given", "given": str(given), "file": target.name, "chunks": chunks,
                        "chunk_tokens": size, "tokens": chunks * size if chunks and size else None,
                        "seconds": None, "datasets": facts["datasets"], "reused": reused}

    settings = {"max_tokens": max_tokens, "chunk_tokens": CHUNK_TOKENS,
                "dataset": run_info.dataset if run_info is not None else None,
                "template": "training chat template (train.conversations.render), --parse-special"}
    record = record_path(target)
    if reuse and target.is_file() and record.is_file():
        try:
            description = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            description = {}
        if description.get("settings") == settings and imatrix_problem(target) is None:
            log(f"imatrix: {target.name} is complete, skipping")
            return target, {**description, "reused": True}
    text, counted = calibration_text(calibration_conversations(run_info), tokenizer, max_tokens)
    text_file = calibration_file(out_dir)
    write_text_atomic(text_file, text)
    chunks = max(2, min(counted["tokens"], max_tokens) // CHUNK_TOKENS)
    log(f"imatrix: {counted['conversations']} training conversations ({counted['tokens']:,} tokens, held-out "
        f"excluded) -> {target.name}, {chunks} chunks of {CHUNK_TOKENS} tokens")
    computed = compute_imatrix(f16, text_file, target, chunks=chunks, threads=threads, log=log)
    text_file.unlink(missing_ok=True)
    description = {"source": "training conversations", "file": target.name, "dataset": settings["dataset"],
                   "conversations": counted["conversations"], "repeated": counted["repeated"],
                   "tokens": computed["chunks"] * computed["chunk_tokens"] if computed["chunks"] else None,
                   "chunks": computed["chunks"], "chunk_tokens": computed["chunk_tokens"],
                   "seconds": computed["seconds"], "settings": settings}
    write_text_atomic(record, json.dumps(description, indent=2))
    log(f"imatrix: wrote {target.name} in {computed['seconds']:.1f} s")
    return target, {**description, "reused": False}
