"""What this machine lets a process use."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path


CGROUP = Path("/sys/fs/cgroup")  # where Linux mounts the control groups (v2: one tree; v1: a folder per controller)


@dataclass(frozen=True)
class CpuBudget:
    """How many CPUs this process may keep busy, and why: its affinity mask and its cgroup's CPU quota."""

    affinity: int  # CPUs the scheduler may run this process on
    quota: float | None  # CPUs' worth of time the cgroup allows per period; None: no limit
    source: str  # where the quota came from (a file), or why there is none

    @property
    def cpus(self) -> int:
        """The smaller of the two, at least 1 (a quota of 1.5 CPUs keeps 1 thread busy, not 2).

        >>> CpuBudget(affinity=64, quota=2.0, source="cpu.max").cpus, CpuBudget(8, None, "no quota").cpus
        (2, 8)
        >>> CpuBudget(affinity=2, quota=0.5, source="cpu.max").cpus
        1
        """
        return max(1, min(self.affinity, int(self.quota) if self.quota is not None else self.affinity))

    def describe(self) -> str:
        """One log line: the count and what decided it.

        >>> CpuBudget(64, 2.0, "/sys/fs/cgroup/cpu.max").describe()
        'threads: 2 (the cgroup quota, 2 CPUs in /sys/fs/cgroup/cpu.max; the affinity mask allows 64)'
        >>> CpuBudget(2, None, "no cgroup CPU quota").describe()
        'threads: 2 (the affinity mask; no cgroup CPU quota)'
        """
        if self.quota is not None and self.cpus < self.affinity:
            return (f"threads: {self.cpus} (the cgroup quota, {self.quota:g} CPUs in {self.source}; the affinity "
                    f"mask allows {self.affinity})")
        quota = f"cgroup quota {self.quota:g} CPUs ({self.source})" if self.quota is not None else self.source
        return f"threads: {self.cpus} (the affinity mask; {quota})"


def cgroup_quota(root: Path = CGROUP) -> tuple[float | None, str]:
    """The CPU quota of this process's cgroup in CPUs, and the file it came from (or why there is none).
    v2: `cpu.max` holds "QUOTA PERIOD" or "max PERIOD"; v1: `cpu/cpu.cfs_quota_us` (-1: none) over
    `cpu/cpu.cfs_period_us` (also found as cpu,cpuacct/). A container sees its own cgroup at the root."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None, f"no cgroup CPU quota ({root / 'cpu.max'}: max)"
        return int(quota) / int(period), str(root / "cpu.max")
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota_us = int((folder / "cpu.cfs_quota_us").read_text())
            period_us = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if quota_us <= 0 or period_us <= 0:
            return None, f"no cgroup CPU quota ({folder / 'cpu.cfs_quota_us'}: {quota_us})"
        return quota_us / period_us, str(folder / "cpu.cfs_quota_us")
    return None, "no cgroup CPU quota found"


def cpu_budget(root: Path = CGROUP) -> CpuBudget:
    """This process's CPU budget: its affinity mask and its cgroup's quota (`root`: the cgroup mount, for tests)."""
    try:
        affinity = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        affinity = os.cpu_count() or 1
    quota, source = cgroup_quota(root)
    return CpuBudget(affinity, quota, source)


def usable_cpus(root: Path = CGROUP) -> int:
    """CPUs this process may keep busy, not the machine's count: the smaller of its affinity mask and its cgroup's
    CPU quota. A Space container sees the host's cores in os.cpu_count(), and may see them in its affinity mask too
    while its quota (cgroup cpu.max) allows 2; more llama.cpp threads than that make it several times slower."""
    return cpu_budget(root).cpus


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
