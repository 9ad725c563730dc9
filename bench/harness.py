"""One measured step, in a fresh process: its wall time, its peak memory and the figures it returns.

    from bench.harness import measured
    measured("quantize", source="work/1b-F16.gguf", out="work/1b-Q4_K_M.gguf")   # {"wall_s": …, "peak_rss": …}

The protocol: the parent runs `python scripts/bench.py --worker '{"step": NAME, ARGUMENT: VALUE…}'`; the worker
runs bench.steps.WORKER_STEPS[NAME](**ARGUMENTS) inside PeakMemory and prints one line `BENCH-RESULT {json}` on
stdout as its last word (its progress and errors go to stderr). Every step that loads a model runs in its own
process, so the peak RSS reported is that process tree's own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

from bench import REPO

RESULT_PREFIX = "BENCH-RESULT "
ENTRY_SCRIPT = REPO / "scripts" / "bench.py"

# Steps whose speed is measured run without the memory sampler: on 2 cores even its short wake-ups would delay
# llama.cpp's threads, which wait for one another at every layer. Their peak RSS is the kernel's high-water mark.
UNSAMPLED_STEPS = ("generate", "space", "bandwidth")


class PeakMemory:
    """Samples this process and its children every 20 ms: the peak of their summed RSS and of its anonymous part
    (RSS minus file-backed pages, which the kernel can drop under pressure rather than kill the process)."""

    def __init__(self, sample: bool = True):
        import psutil

        self.root, self.sample = psutil.Process(), sample
        self.peak_rss = self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        rss = anon = 0
        for process in [self.root, *self.root.children(recursive=True)]:
            try:
                info = process.memory_info()
            except psutil.Error:
                continue
            rss += info.rss
            anon += info.rss - info.shared
        self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def __enter__(self):
        if self.sample:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.sample:
            self._thread.join()
        import resource

        # The kernel's own high-water marks catch a peak shorter than the sampling period.
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            self.peak_rss = max(self.peak_rss, resource.getrusage(who).ru_maxrss * 1024)


def measured(step: str, **arguments) -> dict:
    """Run one step in a fresh process: its wall time (imports included, as a user waits for them), peak memory and
    whatever figures the step returns."""
    command = [sys.executable, str(ENTRY_SCRIPT), "--worker", json.dumps({"step": step, **arguments})]
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True)  # stderr: progress, errors
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"bench: step {step} failed (exit {completed.returncode}); its output:\n"
                         f"{completed.stdout[-2000:]}")
    line = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)][-1]
    return {"wall_s": wall, **json.loads(line[len(RESULT_PREFIX):])}


def worker(spec: dict) -> None:
    """The worker's side (--worker): run the step `spec` names with the rest of `spec` as its arguments, and print
    its figures and peak memory as the result line."""
    from bench.steps import WORKER_STEPS

    step = spec.pop("step")
    with PeakMemory(sample=step not in UNSAMPLED_STEPS) as memory:
        figures = WORKER_STEPS[step](**spec) or {}
    print(RESULT_PREFIX + json.dumps({"peak_rss": memory.peak_rss, "peak_anon": memory.peak_anon, **figures}),
          flush=True)
