"""llama.cpp's own command-line tools, built once per machine from the llama.cpp release the installed llama-cpp-python
was compiled from (the source archive's `vendor/llama.cpp/`, common/llama_source.py): llama-server for the Space,
llama-imatrix, llama-quantize and llama-perplexity for the export's importance-matrix quants and their check.

    from common.llama_tools import llama_tool
    imatrix = llama_tool("llama-imatrix")   # the first call builds every tool (one CMake build), later ones reuse it

One CMake build makes all of TOOLS (they share libllama and ggml, so four targets cost little more than one): the
binaries are kept in <cache folder>/llama.cpp-tools-<version>-<machine>/ ($FINETOME_LLAMA_TOOLS names another
folder), named by the llama-cpp-python version and by this machine's CPU (GGML_NATIVE, llama.cpp's default, compiles
for the building CPU's instructions, so a folder restored onto another kind of CPU is built again rather than dying
with SIGILL). The folder appears complete or not at all. Measured on 2 cores (Xeon, 2026-12-06): see README.md ("llama.cpp's tools").
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common.llama_runtime import LlamaSetupError, extra_buffers
from common.llama3 import cache_root
from common.llama_source import extract_vendored, llama_cpp_version, source_archive
from common.machine import usable_cpus

__all__ = ["TOOLS", "TOOLS_ENV", "CMAKE_OPTIONS", "machine_key", "tools_dir", "tools_are_built", "build_llama_tools",
           "llama_tool", "safe_path_args"]

TOOLS = ("llama-server", "llama-imatrix", "llama-quantize", "llama-perplexity")

# CPU only, static (the binaries are copied out of the build tree), no tests or examples; GGML_NATIVE is llama.cpp's
# default (this machine's own instructions): the binaries are built where they run, and their folder is named by
# the machine (machine_key).
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
                 "-DGGML_CCACHE=OFF")
BUILD_RECORD = "build.json"
TOOLS_ENV = "FINETOME_LLAMA_TOOLS"  # where the built tools are kept, when not in the cache folder (the tests' own)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86, arm
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor()


def machine_key() -> str:
    """Short name of what a native build depends on: the architecture and the CPU's instruction-set flags.

    >>> len(machine_key()) == len(platform.machine()) + 9
    True
    """
    digest = hashlib.sha256(f"{platform.machine()} {_cpu_flags()}".encode()).hexdigest()[:8]
    return f"{platform.machine()}-{digest}"


def tools_dir(root: Path | None = None) -> Path:
    """The folder holding the built tools: one per llama-cpp-python version and machine, under `root` (default:
    $FINETOME_LLAMA_TOOLS, else the cache folder)."""
    root = root or Path(os.environ.get(TOOLS_ENV) or cache_root())
    return root / f"llama.cpp-tools-{llama_cpp_version()}-{machine_key()}"


def tools_are_built(root: Path | None = None) -> bool:
    folder = tools_dir(root)
    return all((folder / tool).is_file() for tool in TOOLS)


def build_llama_tools(log: Callable[[str], None] = print, jobs: int | None = None, root: Path | None = None,
                      without: str = "") -> Path:
    """Every tool of TOOLS, built once with CMake from the source archive's vendor/llama.cpp; the folder holding them.

    `without` completes the error raised when cmake or a C++ compiler is missing: what the caller can do instead."""
    folder = tools_dir(root)
    if tools_are_built(root):
        return folder
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        raise LlamaSetupError(f"building llama.cpp's tools ({', '.join(TOOLS)}) needs {' and '.join(missing)}; "
                              "install them (Debian/Ubuntu: apt-get install cmake g++; macOS: xcode-select --install "
                              f"and brew install cmake){without}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    jobs = jobs or usable_cpus()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".llama-tools-build-") as scratch:
        log(f"llama.cpp tools: extracting llama.cpp from llama-cpp-python {llama_cpp_version()}'s source archive")
        source = Path(scratch) / "llama.cpp"
        extract_vendored(source_archive(log=log), source)
        build = source / "build"
        log(f"llama.cpp tools: building {', '.join(TOOLS)} with CMake (CPU only, {jobs} jobs; about 10 min on 2 "
            "cores, once per machine and llama-cpp-python version)")
        for command in (["cmake", "-S", str(source), "-B", str(build), *CMAKE_OPTIONS],
                        ["cmake", "--build", str(build), "--target", *TOOLS, "-j", str(jobs)]):
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                output = (result.stderr.strip() or result.stdout.strip()).splitlines()
                error = next((line for line in output if "error" in line.lower()), output[-1] if output else "")
                raise LlamaSetupError(f"building llama.cpp's tools failed at `{' '.join(command[:2])}`: "
                                      f"{error.strip() or 'no output'}")
        staged = Path(scratch) / "tools"
        staged.mkdir()
        for tool in TOOLS:
            shutil.copy2(build / "bin" / tool, staged / tool)
        seconds = round(time.perf_counter() - started, 1)
        (staged / BUILD_RECORD).write_text(json.dumps(
            {"llama_cpp_python": llama_cpp_version(), "machine": machine_key(), "tools": list(TOOLS),
             "cmake_options": list(CMAKE_OPTIONS), "jobs": jobs, "seconds": seconds}, indent=2))
        if folder.exists():  # an incomplete folder from elsewhere (copied by hand, an older build): replaced
            shutil.rmtree(folder)
        try:
            staged.rename(folder)  # complete or absent, never half-copied under the final name
        except OSError:
            if not tools_are_built(root):  # another process finished the same build first: theirs is kept
                raise
    log(f"llama.cpp tools: built in {seconds:.0f} s: {folder}")
    return folder


def llama_tool(name: str, log: Callable[[str], None] = print, root: Path | None = None, without: str = "") -> Path:
    """The path of one built tool (building them all the first time)."""
    if name not in TOOLS:
        raise LlamaSetupError(f"unknown llama.cpp tool {name!r}; choose one of: {', '.join(TOOLS)}")
    return build_llama_tools(log=log, root=root, without=without) / name


def safe_path_args() -> list[str]:
    """The flags that put a llama.cpp tool on the path common.llama_runtime chooses for this process: `--no-repack` (extra
    buffer types off, where the AMX path would crash decoding q4_k_m or q8_0). llama-server, llama-imatrix and
    llama-perplexity share llama.cpp's common arguments, which accept it."""
    return [] if extra_buffers().enabled else ["--no-repack"]

