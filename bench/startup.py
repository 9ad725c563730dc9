"""Training start-up on a full-size FineTome: time to the first optimizer step and peak RSS, fresh and resumed.

    python scripts/bench.py --sections startup --repeats 3

FineTome-100k itself is on the Hub, which no machine here reaches; the benchmark writes a file of its shape instead:
100,000 rows in its schema, 2,490 bytes each on average (249 MB, FineTome's size), made from the shipped sample's
conversations with each answer repeated to length and each first question numbered, so no two rows are equal.

Each repetition runs the real CLI (`train/run.py --preset tiny --max-seq-length 2048 --max-steps 2 --save-steps 1`)
in a fresh output folder, kills it with SIGKILL once checkpoint-1 is sealed (a dead Colab runtime), then runs the
same command again, which resumes. Both runs' start-up is read from the lines the trainer prints when it is ready
to train (data, model and checkpoint loaded) and when the first optimizer step of the run ends, in seconds since
the process started (the kernel's clock). Peak RSS is the sampled sum over the run's process tree (the data
preparation's worker processes included), taken at "ready to train" and over the whole run; the latter includes
the CPU training step itself, whose logits over Llama-3's 128,256-token vocabulary at 2,048 tokens take GBs of
host RAM here and GPU memory on a real run.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import REPO, log
from common.files import temporary_path

SAMPLE = REPO / "train" / "data" / "finetome_sample.jsonl"
ROWS, MEAN_BYTES = 100_000, 2_490  # FineTome-100k: 100,000 conversations, 249 MB
READY = re.compile(r"start-up: ready to train ([\d.]+) s after")
FIRST_STEP = re.compile(r"step (\d+): the first optimizer step of this run ended ([\d.]+) s after")
ARGS = ["--preset", "tiny", "--max-seq-length", "2048", "--max-steps", "2", "--save-steps", "1"]


def finetome_shaped_lines(count: int = ROWS, mean_bytes: int = MEAN_BYTES):
    """JSON lines in FineTome's schema whose running mean size stays at `mean_bytes`."""
    sample = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    written = 0
    for index in range(count):
        row = copy.deepcopy(sample[index % len(sample)])
        row["conversations"][0]["value"] = f"({index}) {row['conversations'][0]['value']}"
        answers = [turn for turn in row["conversations"] if turn["from"] == "gpt"]
        originals = [turn["value"] for turn in answers]
        line, target, repeats = json.dumps(row, ensure_ascii=False), mean_bytes * (index + 1) - written, 1
        while len(line.encode()) < target and repeats < 64:
            repeats += 1
            for turn, original in zip(answers, originals):
                turn["value"] = "\n\n".join([original] * repeats)
            line = json.dumps(row, ensure_ascii=False)
        written += len(line.encode()) + 1
        yield line


def ensure_dataset(work: Path) -> Path:
    """The FineTome-shaped file under `work`, written once (atomically) and reused."""
    path = work / "finetome-100k-shaped.jsonl"
    if not path.is_file():
        work.mkdir(parents=True, exist_ok=True)
        temporary = temporary_path(path)
        with temporary.open("w", encoding="utf-8") as handle:
            for line in finetome_shaped_lines():
                handle.write(line + "\n")
        os.replace(temporary, path)
    return path


class TreeMemory(threading.Thread):
    """Samples a process and its descendants every 50 ms: the peak of their summed RSS."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_rss, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.done.wait(0.05):
            total = 0
            try:
                processes = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for process in processes:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_rss = max(self.peak_rss, total)


def one_start(dataset: Path, out: Path, kill_after: Path | None) -> dict:
    """One run of the CLI until it exits (or is killed once `kill_after` exists): when its first optimizer step
    ended, its peak RSS, and whether it prepared the data or reused it."""
    command = [sys.executable, str(REPO / "train/run.py"), *ARGS, "--dataset", str(dataset), "--output-dir", str(out)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    memory = TreeMemory(process.pid)
    memory.start()
    first, ready, lines = None, None, []
    for line in process.stdout:
        lines.append(line.rstrip())
        if match := READY.search(line):
            ready = {"seconds": float(match.group(1)), "peak_rss": memory.peak_rss}
        if match := FIRST_STEP.search(line):
            first = {"step": int(match.group(1)), "seconds": float(match.group(2))}
        if kill_after is not None and first and kill_after.exists():
            process.send_signal(signal.SIGKILL)
            break
    process.wait()
    memory.done.set()
    memory.join()
    if first is None or ready is None or (kill_after is None and process.returncode != 0):
        raise SystemExit("bench: the training run failed; its last lines:\n" + "\n".join(lines[-15:]))
    return {"ready_s": ready["seconds"], "ready_peak_rss": ready["peak_rss"], "first_step": first["step"],
            "first_step_s": first["seconds"], "peak_rss": memory.peak_rss,
            "reused": any(line.startswith("data: reusing") for line in lines)}


def measure(work: Path, repeats: int) -> dict:
    started = time.perf_counter()
    dataset = ensure_dataset(work)
    log(f"startup: {dataset.name}, {dataset.stat().st_size / 1e6:.0f} MB (written in "
        f"{time.perf_counter() - started:.0f} s or reused)")
    runs = {"fresh": [], "resume": []}
    for repeat in range(repeats):
        out = work / "startup-run"
        shutil.rmtree(out, ignore_errors=True)
        sealed = out / "checkpoint-1" / "checkpoint_manifest.json"
        runs["fresh"].append(one_start(dataset, out, kill_after=sealed))
        runs["resume"].append(one_start(dataset, out, kill_after=None))
        log(f"startup {repeat + 1}/{repeats}: fresh {runs['fresh'][-1]['first_step_s']:.1f} s, "
            f"resume {runs['resume'][-1]['first_step_s']:.1f} s")
        shutil.rmtree(out, ignore_errors=True)
    return {"rows": ROWS, "dataset_bytes": dataset.stat().st_size, "command": " ".join(ARGS), "runs": runs}


# Measured by the same command before data preparation moved to Arrow (lists of every conversation, all tokenized
# before the first step): issue 11's figures, from the CLI on the same 100,000-row, 249 MB FineTome-shaped file.
BEFORE = {"first_step_s": 7 * 60 + 39, "peak_rss": 8.9e9, "source": "issue 11, the CLI before this change"}
TARGETS = {"fresh": (60, 2e9), "resume": (20, None)}


def render(section: dict) -> list[str]:
    """The start-up section of docs/benchmarks.md."""
    import statistics

    def median(kind: str, key: str) -> float:
        return statistics.median(run[key] for run in section["runs"][kind])

    def runs(kind: str, key: str, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
        return ", ".join(fmt.format(run[key] / scale) for run in section["runs"][kind])

    count = len(section["runs"]["fresh"])
    lines = ["## Training start-up on a full-size FineTome", "",
             f"Measured {section['measured']} on {section['cpu']}, {section['cores']} usable cores "
             f"(`python scripts/bench.py --sections startup --repeats {count}`): the CLI "
             f"(`train/run.py {section['command']}`) on a {section['rows']:,}-row, "
             f"{section['dataset_bytes'] / 1e6:.0f} MB file in FineTome's schema, killed with SIGKILL once "
             "checkpoint-1 is sealed and run again (it resumes); seconds since the process started.", "",
             "| run | ready to train (median) | runs | first step ended (median) | peak RSS when ready | "
             "peak RSS, whole run | target |", "|---|---|---|---|---|---|---|"]
    for kind in ("fresh", "resume"):
        seconds, memory = TARGETS[kind]
        target = f"≤ {seconds} s" + (f", ≤ {memory / 1e9:.0f} GB" if memory else "")
        lines.append(f"| {kind} | **{median(kind, 'ready_s'):.1f} s** | {runs(kind, 'ready_s')} | "
                     f"{median(kind, 'first_step_s'):.1f} s | **{median(kind, 'ready_peak_rss') / 1e9:.2f} GB** | "
                     f"{median(kind, 'peak_rss') / 1e9:.2f} GB | {target} |")
    lines += [f"| before (lists, everything tokenized) | | | {BEFORE['first_step_s'] / 60:.1f} min | | "
              f"{BEFORE['peak_rss'] / 1e9:.1f} GB | ({BEFORE['source']}) |", "",
              f"Fresh: {median('fresh', 'first_step_s'):.0f} s to the first optimizer step against "
              f"{BEFORE['first_step_s']:.0f} s before (**{BEFORE['first_step_s'] / median('fresh', 'first_step_s'):.0f}× "
              f"sooner**). The rows are read into Arrow and checked in parallel worker processes (memory-mapped: "
              "the 249 MB cost disk, not RAM); only the 16 conversations 2 steps read, and the eval split, are "
              "tokenized, then kept in `<output-dir>/data` with a fingerprint of the file and the settings. A resume "
              "finds them there and reads nothing else. 'First step ended' includes that step's compute on this "
              "CPU; the whole-run peak includes its logits (2 × 2,048 tokens × 128,256 vocabulary entries in fp32, "
              "and their gradient), which a GPU run holds in GPU memory instead.", ""]
    return lines
