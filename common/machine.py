"""What this machine lets a process use."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity), not the machine's count: a Space container sees the host's
    cores in os.cpu_count(), and more llama.cpp threads than usable cores make it several times slower."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    """The CPU's model name, as the kernel reports it (for benchmark and report headers)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def process_age() -> float | None:
    """Seconds since this process started (imports included, as a user waits for them), from the kernel's own
    start time; None where /proc does not say (not Linux)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def rss_bytes() -> int | None:
    """This process's resident memory now (Linux's /proc; None elsewhere), without psutil, which the Space lacks."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


MALLOC_ARENA_MAX_ENV = "MALLOC_ARENA_MAX"
_M_ARENA_MAX = -8  # glibc's mallopt parameter number for M_ARENA_MAX (malloc.h)


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas at `arenas` for this process (as MALLOC_ARENA_MAX=2 would at its start), unless
    MALLOC_ARENA_MAX is set; whether the cap was applied. glibc gives threads arenas of their own, up to 8 per
    core: a server whose worker threads (Gradio's) take turns allocating and freeing grows a little with every
    request as those arenas fragment. Measured on the Space (docs/benchmarks.md, "Memory under a crowd"): RSS
    kept growing wave after wave by default and stayed flat with 2 arenas. False (nothing changed) off glibc."""
    if os.environ.get(MALLOC_ARENA_MAX_ENV):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, max(1, arenas)))
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return False
