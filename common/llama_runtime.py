"""The one place where the project opens a GGUF with llama.cpp (llama-cpp-python's `Llama`).

    from common.llama_runtime import open_gguf
    llm = open_gguf("outputs/demo/gguf/Tiny-Llama-3.2-FineTome-Q4_K_M.gguf", n_ctx=1024)

The Space engine, the export's verification, compare, bench and the demo all open their models here, so that
two decisions are made once: threads default to the CPUs this process may use (common.machine.usable_cpus), and
on CPUs where llama.cpp takes its AMX path the model is loaded without llama.cpp's extra buffer types.

Why. llama.cpp's CPU backend keeps quantized weights in "extra" buffer types that lay them out for faster
kernels: AMX first (compiled in when the library was built on an Intel CPU with AMX, Sapphire Rapids and later,
since pip builds llama-cpp-python with -march=native), then the generic REPACK. On such CPUs, decoding a q4_k_m
or q8_0 GGUF segfaults inside ggml_backend_amx_mul_mat (llama.cpp issue 20824, closed without a fix; ollama issue
17205 on AWS m7i; seen on a Sapphire Rapids-class Xeon by this project: every test that decoded a q4_k_m or q8_0
GGUF died with signal 11, and all passed with extra buffer types off). F16 decodes either way.

What. llama.cpp has one switch for all extra buffer types, `llama_model_params.use_extra_bufts` (its CLI's
--no-repack). The AMX buffer type cannot be turned off alone: it comes first in the CPU backend's list, and a
tensor override to the CPU buffer type selects from that same list again, while an override to REPACK's buffer
type skips the check of which tensor types it can hold (llama-model-loader.cpp). So:

- llama.cpp's own system info reports `AMX_INT8 = 1` (the loaded library has the AMX path): extra buffer types
  off, the safe path. The system info reads the library, not the CPU: a portable build (GGML_NATIVE=OFF, as
  scripts/deploy_space.py asks of the Space's build) has no AMX path on any CPU and keeps them on.
- everywhere else: on, llama.cpp's default (what it is worth against off is measured in docs/benchmarks.md; on
  this project's 2-core AMD EPYC build machine, off was no slower).

FINETOME_LLAMA_EXTRA_BUFFERS=on|off overrides the choice either way; auto (the default) decides as above.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from .machine import usable_cpus

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)

EXTRA_BUFFERS_ENV = "FINETOME_LLAMA_EXTRA_BUFFERS"
_ON, _OFF, _AUTO = ("1", "on", "true", "yes"), ("0", "off", "false", "no"), ("", "auto")


class LlamaSetupError(ValueError):
    """A setting for llama.cpp that cannot be used; the message is one line with the value and the fix."""


def parse_system_info(text: str) -> dict[str, dict[str, str]]:
    """llama.cpp's system info (`llama_print_system_info()`) as {backend: {feature: value}}.

    >>> parse_system_info("CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1 | ")
    {'CPU': {'SSE3': '1', 'AVX2': '1', 'AMX_INT8': '1', 'REPACK': '1'}}
    >>> parse_system_info("CPU : AVX2 = 1 | CUDA : ARCHS = 750,890 | USE_GRAPHS = 1 | ")["CUDA"]
    {'ARCHS': '750,890', 'USE_GRAPHS': '1'}
    >>> parse_system_info("")
    {}
    """
    backends: dict[str, dict[str, str]] = {}
    features: dict[str, str] | None = None
    for field in text.split("|"):
        if " : " in field:  # a backend's section starts: "CPU : SSE3 = 1"
            backend, field = field.split(" : ", 1)
            features = backends.setdefault(backend.strip(), {})
        if features is not None and "=" in field:
            name, value = field.split("=", 1)
            features[name.strip()] = value.strip()
    return backends


@dataclass(frozen=True)
class ExtraBuffers:
    """Whether llama.cpp may use its extra CPU buffer types (AMX, REPACK) for weights, and why."""

    enabled: bool
    reason: str

    def describe(self) -> str:
        path = "default path: extra buffer types on" if self.enabled else "safe path: extra buffer types off"
        return f"llama.cpp {path} ({self.reason}; {EXTRA_BUFFERS_ENV}=on|off overrides)"


def choose_extra_buffers(system_info: str, override: str | None = None) -> ExtraBuffers:
    """The choice for a library whose system info is `system_info`, with `override` from the environment.

    >>> choose_extra_buffers("CPU : AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 | ").enabled
    False
    >>> choose_extra_buffers("CPU : AVX2 = 1 | REPACK = 1 | ").enabled
    True
    >>> choose_extra_buffers("CPU : AVX2 = 1 | AMX_INT8 = 1 | ", override="on").reason
    'FINETOME_LLAMA_EXTRA_BUFFERS=on'
    """
    setting = (override or "").strip().lower()
    if setting in _ON:
        return ExtraBuffers(True, f"{EXTRA_BUFFERS_ENV}={override}")
    if setting in _OFF:
        return ExtraBuffers(False, f"{EXTRA_BUFFERS_ENV}={override}")
    if setting not in _AUTO:
        raise LlamaSetupError(f"{EXTRA_BUFFERS_ENV}={override!r} is not a setting; use on, off or auto "
                              f"(auto turns llama.cpp's extra buffer types off only where it has its AMX path)")
    cpu = parse_system_info(system_info).get("CPU", {})
    if cpu.get("AMX_INT8") == "1":
        return ExtraBuffers(False, "llama.cpp reports AMX_INT8 = 1, whose path crashes on q4_k_m/q8_0: "
                                   "llama.cpp issue 20824")
    return ExtraBuffers(True, "llama.cpp reports no AMX path")


@cache
def system_info() -> str:
    """The loaded llama.cpp library's system info (its CPU features and build options)."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


_logged: set[str] = set()


def extra_buffers() -> ExtraBuffers:
    """This process's choice (the environment is read each time, so a test or a user may change it); logged once."""
    choice = choose_extra_buffers(system_info(), os.environ.get(EXTRA_BUFFERS_ENV))
    if choice.describe() not in _logged:
        _logged.add(choice.describe())
        log.info(choice.describe())
    return choice


# llama-cpp-python 0.3.36 builds llama_model_params inside Llama.__init__ from llama_model_default_params() and
# has no argument for use_extra_bufts; the public function it calls is swapped for the length of one
# construction. The lock keeps constructions on two threads (and their swaps) from interleaving; it is reentrant
# so that a construction inside another (a stand-in for from_pretrained in the tests) nests its swap.
_constructing = threading.RLock()


@contextmanager
def _model_params(use_extra_bufts: bool) -> Iterator[None]:
    import llama_cpp.llama_cpp as bindings  # the module llama_cpp/llama.py reads its defaults from

    default = bindings.llama_model_default_params

    def with_choice():
        params = default()
        params.use_extra_bufts = use_extra_bufts
        return params

    with _constructing:
        bindings.llama_model_default_params = with_choice
        try:
            yield
        finally:
            bindings.llama_model_default_params = default


def _settings(settings: dict) -> dict:
    threads = settings.pop("n_threads", None) or usable_cpus()
    return {"n_threads": threads, "n_threads_batch": settings.pop("n_threads_batch", None) or threads,
            "verbose": False, **settings}


def open_gguf(path, **settings) -> Llama:
    """`Llama(model_path=path, **settings)`, safe on every CPU; threads default to the usable CPUs, verbose off."""
    from llama_cpp import Llama

    with _model_params(extra_buffers().enabled):
        return Llama(model_path=str(path), **_settings(settings))


def open_gguf_from_hub(repo_id: str, filename: str, **settings) -> Llama:
    """`Llama.from_pretrained(repo_id, filename, **settings)` (a glob for filename; the file goes to the
    huggingface_hub cache), with open_gguf's settings."""
    from llama_cpp import Llama

    with _model_params(extra_buffers().enabled):
        return Llama.from_pretrained(repo_id, filename, **_settings(settings))


def token_piece(llm: Llama, token: int, special: bool = True) -> bytes:
    """One token's text as bytes, whatever its length (`special`: a control token's name, else nothing for it).

    Not `llm.detokenize([token])`: llama-cpp-python 0.3.36 gives each token a 32-byte buffer there and returns b""
    for a longer piece (Llama 3's vocabulary has them: runs of '=', '-' or spaces up to 128 bytes)."""
    import ctypes

    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    buffer = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buffer, 64, 0, special)
    if n < 0:  # the piece needs -n bytes
        buffer = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, -n, 0, special)
    return buffer.raw[:n]


def gguf_chat_formatter(llm: Llama):
    """The GGUF's own chat template (`tokenizer.chat_template`) as a Jinja2ChatFormatter, built the way Llama.__init__
    builds its chat handler, stopping at the GGUF's end-of-generation token (<|eot_id|> for Llama 3.x); None when
    the GGUF has no template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    eos_id, bos_id = llm.token_eos(), llm.token_bos()

    def text_of(token_id: int) -> str:
        return llm.detokenize([token_id], special=True).decode("utf-8") if token_id != -1 else ""

    return Jinja2ChatFormatter(template=template, eos_token=text_of(eos_id), bos_token=text_of(bos_id),
                               stop_token_ids=[eos_id])
