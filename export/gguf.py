"""llama.cpp's own tools, without compiling or cloning anything.

- Conversion: `convert_hf_to_gguf.py` (with its `conversion/` and `gguf-py/` packages) taken from the source
  archive of the *installed* llama-cpp-python on PyPI (`vendor/llama.cpp/`), so the GGUF format always matches the
  runtime that will load it. The archive is fetched once per machine (common/llama_source.py) and the converter
  extracted once per version into the cache; `--llama-cpp-dir` points at another checkout.
- Quantization: `llama_cpp.llama_model_quantize` from the library llama-cpp-python already loads.

Every file is written under a temporary name in its final folder and renamed when complete.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common import llama_source as source
from common.files import temporary_path
from common.llama_runtime import LlamaSetupError
from common.llama3 import cache_root
from common.machine import usable_cpus

from .errors import ExportError


@dataclass(frozen=True)
class QuantType:
    """Every fact about one GGUF type, so that no second table can forget one (every exported file is checked
    against its own entry: tests/test_export.py holds that each entry has them all)."""

    name: str  # as users type it: q4_k_m
    suffix: str  # as llama.cpp names files: Q4_K_M
    ftype: str  # llama_cpp constant holding llama.cpp's file type
    label: str  # what it is, for the model card
    # Largest mean KL divergence on the held-out text: from the merged model for f16 (the reference every other file
    # is compared with), from the f16 GGUF for every other type.
    kld_limit: float
    taught_min_share: float  # taught answers a taught run's file must reproduce word for word (the demo preset)
    quantized: bool = True  # False: 16-bit, made by the converter, not the quantizer
    imatrix: bool = False  # k-quants: an importance matrix (--imatrix) steers their rounding


# KLD limits: q8_0 and q4_k_m are the limits for trained models; q6_k and q5_k_m sit between them by bits per
# weight; bf16 rounds the same 16-bit weights as f16 differently (llama.cpp measured KLD 0.000025 between Llama-3-8B's
# BF16 and F16). f16 against the merged fp16 model: the files hold the same numbers, only the arithmetic differs.
# Taught shares: measured on the demo preset (seed 3407, 40 steps), f16, q8_0 and q4_k_m each reproduced 5/5; 16-bit
# and 8-bit files must stay exact; 4- to 6-bit rounding may flip a near-tie, so they need 4 in 5.
QUANT_TYPES = {
    q.name: q
    for q in (
        QuantType("f16", "F16", "LLAMA_FTYPE_MOSTLY_F16", "16-bit float, unquantized", 0.005, 1.0, quantized=False),
        QuantType("bf16", "BF16", "LLAMA_FTYPE_MOSTLY_BF16", "bfloat16, unquantized", 0.002, 1.0, quantized=False),
        QuantType("q8_0", "Q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0", "8-bit, near-lossless", 0.005, 1.0),
        QuantType("q6_k", "Q6_K", "LLAMA_FTYPE_MOSTLY_Q6_K", "6-bit k-quant", 0.02, 0.8, imatrix=True),
        QuantType("q5_k_m", "Q5_K_M", "LLAMA_FTYPE_MOSTLY_Q5_K_M", "5-bit k-quant, medium", 0.05, 0.8, imatrix=True),
        QuantType("q4_k_m", "Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q4_K_M", "4-bit k-quant, medium: the usual choice for CPUs",
                  0.1, 0.8, imatrix=True),
    )
}


def quant_type(name: str) -> QuantType:
    """
    >>> quant_type("Q4_K_M").suffix
    'Q4_K_M'
    """
    key = name.lower()
    if key not in QUANT_TYPES:
        raise ExportError(f"--quant {name!r}: unknown quant type; choose from: {', '.join(QUANT_TYPES)}")
    return QUANT_TYPES[key]


def gguf_file_name(model_name: str, quant: str) -> str:
    """llama.cpp's naming convention.

    >>> gguf_file_name("Llama-3.2-1B-Instruct-FineTome", "q4_k_m")
    'Llama-3.2-1B-Instruct-FineTome-Q4_K_M.gguf'
    """
    return f"{model_name}-{quant_type(quant).suffix}.gguf"


def ftype_value(quant: str) -> int:
    import llama_cpp

    return int(getattr(llama_cpp, quant_type(quant).ftype))


# ---------------------------------------------------------------------- the converter
def llama_cpp_version() -> str:
    try:
        return source.llama_cpp_version()
    except LlamaSetupError as error:
        raise ExportError(str(error)) from None


def converter_cache_dir() -> Path:
    root = cache_root()
    return root / f"llama.cpp-converter-{llama_cpp_version()}"


CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")


def is_converter_dir(folder: Path) -> bool:
    return all((folder / part).exists() for part in CONVERTER_PARTS)


def ensure_converter(llama_cpp_dir: Path | None = None, log=print) -> Path:
    """The folder holding convert_hf_to_gguf.py of the installed llama-cpp-python's llama.cpp release."""
    if llama_cpp_dir is not None:
        folder = Path(llama_cpp_dir).expanduser()
        if not is_converter_dir(folder):
            raise ExportError(f"--llama-cpp-dir {str(folder)!r}: no convert_hf_to_gguf.py with conversion/ and "
                              "gguf-py/ there; point it at a llama.cpp checkout")
        return folder
    target = converter_cache_dir()
    if is_converter_dir(target):
        return target
    version = llama_cpp_version()
    log(f"convert: extracting llama.cpp's converter from llama-cpp-python {version}'s source archive (once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        archive = source.source_archive(log=log)
    except LlamaSetupError as error:
        raise ExportError(f"{error} or pass --llama-cpp-dir pointing at a llama.cpp checkout") from None
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".converter-download-") as scratch:
        staging = Path(scratch) / "converter"
        _extract_converter(archive, staging)
        try:
            staging.rename(target)
        except OSError:
            if not is_converter_dir(target):
                raise
    return target


def _extract_converter(archive: Path, destination: Path) -> None:
    source.extract_vendored(archive, destination, r"convert_hf_to_gguf\.py|conversion/.*|gguf-py/.*")
    if not is_converter_dir(destination):
        raise ExportError(f"{archive.name} has no vendor/llama.cpp/convert_hf_to_gguf.py; "
                          "pass --llama-cpp-dir pointing at a llama.cpp checkout")


_CONVERTED_TENSOR = re.compile(r"torch\.\w+ --> \w+, shape = ")


def _tensor_count(model_dir: Path) -> int:
    """Tensors in a safetensors model folder, from the file headers alone."""
    from safetensors import safe_open

    count = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="np") as handle:
            count += len(list(handle.keys()))
    return count


def _dies_with(parent: int):
    """For the converter's process, before it starts: have the kernel SIGKILL it when the export dies, so a killed
    export (a dead runtime, SIGKILL) never leaves a converter writing a stale temporary file after the rerun's
    cleanup. Linux only (prctl PR_SET_PDEATHSIG); elsewhere nothing changes."""

    def set_up() -> None:
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
            if os.getppid() != parent:  # the export died before the request took effect
                os._exit(1)

    return set_up


def convert_to_gguf(merged_dir: Path, out_file: Path, converter: Path, model_name: str, outtype: str = "f16",
                    log=print, progress: bool = True) -> Path:
    """Run llama.cpp's converter on a Hugging Face model folder; atomic."""
    temporary = temporary_path(out_file)
    command = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(merged_dir), "--outfile", str(temporary),
               "--outtype", outtype, "--model-name", model_name]
    env = {**os.environ}
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use its own gguf-py, matching the runtime
    from tqdm.auto import tqdm

    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               preexec_fn=_dies_with(os.getpid()))
    tail: list[str] = []
    # The converter logs one "name, torch.<dtype> --> <type>, shape = ..." line per tensor: the bar follows them.
    with tqdm(total=_tensor_count(merged_dir), desc=f"convert {outtype.upper()}", unit="tensor",
              file=sys.stdout, disable=not progress) as bar:
        for line in process.stdout:
            tail = (tail + [line.rstrip()])[-20:]  # kept for the error message; the converter is chatty
            if _CONVERTED_TENSOR.search(line):
                bar.update(1)
    if process.wait() != 0:
        temporary.unlink(missing_ok=True)
        error = next((line for line in reversed(tail) if "Error" in line or "error" in line), tail[-1] if tail else "")
        raise ExportError(f"llama.cpp's converter failed on {merged_dir}: {error.strip()}")
    os.replace(temporary, out_file)
    log(f"convert: wrote {out_file.name} ({out_file.stat().st_size / 2**20:.1f} MiB) in "
        f"{time.perf_counter() - started:.1f} s")
    return out_file


# ---------------------------------------------------------------------- quantization
QUANTIZE_BUFFER_BYTES = 256 * 2**20
_PROGRESS = re.compile(rb"\[\s*(\d+)\s*/\s*(\d+)\s*\]")


def quantize(source: Path, out_file: Path, quant: str, threads: int | None = None, progress: bool = True) -> Path:
    """Quantize a GGUF through llama.cpp's library (no compiled tool); atomic; a progress bar over tensors.

    llama.cpp logs one `[ i/ n] tensor-name ...` line per tensor while quantizing: the bar follows those lines.
    """
    import llama_cpp
    from tqdm.auto import tqdm

    temporary = temporary_path(out_file)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_value(quant)
    params.nthread = threads or usable_cpus()
    # llama.cpp converts each tensor to fp32 before quantizing it, in slabs of at most max_buf_size bytes
    # (default 8 GiB: a whole 3B embedding at once, 2.7 GB with its buffers). Bounded slabs keep a 3B quantize
    # inside Colab's RAM at no cost in speed: 3B-shaped q4_k_m peaked at 2.79 GB RSS with the default and 1.09 GB
    # with 256 MiB, both in 101-103 s on 2 cores (scripts/bench.py, docs/benchmarks.md).
    params.max_buf_size = QUANTIZE_BUFFER_BYTES
    bar = tqdm(desc=f"quantize {quant_type(quant).suffix}", unit="tensor", disable=not progress, file=sys.stdout)
    lock = threading.Lock()

    @llama_cpp.llama_log_callback
    def on_log(level, text, user_data):
        match = _PROGRESS.search(text or b"")
        if match:
            with lock:
                bar.total = int(match.group(2))
                bar.update(int(match.group(1)) - bar.n)

    from llama_cpp import _logger

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(temporary).encode(), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))  # llama-cpp-python's own again
        bar.close()
    if status != 0 or not temporary.exists():
        temporary.unlink(missing_ok=True)
        raise ExportError(f"llama.cpp could not quantize {source.name} to {quant} (status {status}); "
                          "is the input a complete GGUF file?")
    os.replace(temporary, out_file)
    return out_file
