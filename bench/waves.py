"""Memory under a crowd: the Space's resident memory over waves of conversations, with its prompt-state bound.

    from bench import waves
    section = waves.measure([Path("1b-Q4_K_M.gguf")] * 2, Path("work"), waves=4, conversations=100, parallel=20,
                            new_tokens=64, cache_mb=128)
    lines = waves.render(section)

`python space/app.py` as a Space runs it, serving the GGUFs as catalog entries of their own (the same file twice is
two models: two contexts, two state caches). Each wave is `conversations` /chat requests through gradio_client,
`parallel` at a time, each in a session of its own with a message of its own (so every answer saves a new prompt
state), alternating between the models. After each wave, with the server idle: its RSS, the anonymous part of it
(the heap: what a leak grows; the rest is GGUF pages mapped from disk), and the state caches' fill, from the memory
line the Space logs (`--memory-log-interval`). The first wave warms up: it loads the models and, with `cache_mb`
smaller than what one wave saves and `max_sessions` no more than one wave's sessions, fills the two things that
grow with visitors to their bounds (the prompt states, and Gradio's ~0.2 MiB of state per session); the waves
after it must not grow RSS by more than 5% in all.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import log
from bench.summary import TARGETS, growth
from common.machine import cpu_name, usable_cpus

GROWTH_TARGET = TARGETS["waves_rss_growth"]  # the most RSS may grow over the waves after the warm-up
_MEMORY_LINE = re.compile(r"^memory: RSS [\d,]+ MiB; saved prompt states .*$", re.MULTILINE)
MESSAGES = (
    "Explain why the sky is blue.", "Write a haiku about trains.", "What is a hash table?",
    "Give me three tips for a job interview.", "How do vaccines work?", "Summarize the plot of Hamlet.",
    "What is the difference between TCP and UDP?", "Suggest a name for a bakery.",
)


def process_memory(pid: int) -> dict:
    """RSS and its anonymous part (bytes) of process `pid`, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    kib = {name: int(fields[name].split()[0]) * 1024 for name in ("VmRSS", "RssAnon", "RssFile")}
    return {"rss": kib["VmRSS"], "anon": kib["RssAnon"], "file": kib["RssFile"]}


def last_memory_line(server_log: Path, after: float) -> str:
    """The Space's newest memory line, waiting (up to 10 s) for one written after `after` (a time.time())."""
    deadline = time.time() + 10
    while time.time() < deadline:
        if server_log.stat().st_mtime > after and (lines := _MEMORY_LINE.findall(server_log.read_text())):
            return lines[-1]
        time.sleep(0.5)
    return "no memory line"


def measure(ggufs: list[Path], folder: Path, waves: int = 4, conversations: int = 100, parallel: int = 20,
            new_tokens: int = 64, cache_mb: int = 128, max_sessions: int = 100) -> dict:
    """RSS of `python space/app.py` before and after each wave of /chat conversations (see the module's doc)."""
    from gradio_client import Client

    from bench.steps import start_space

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, gguf in enumerate(ggufs):  # a name per entry: the catalog's labels come from the file names
        entry = folder / f"{'AB'[index]}-{Path(gguf).name}"
        entry.unlink(missing_ok=True)
        entry.symlink_to(Path(gguf).resolve())
        entries.append(entry)
    labels = [entry.stem for entry in entries]
    process, url, server_log = start_space([str(entry) for entry in entries], folder, 0.1,
                                           "--cache-mb", str(cache_mb), "--max-sessions", str(max_sessions),
                                           "--memory-log-interval", "1")

    def converse(number: int) -> str | None:
        """One conversation of one turn in a session of its own; its error line, if any."""
        try:
            answer, stats = Client(url, verbose=False).predict(
                f"{MESSAGES[number % len(MESSAGES)]} (Conversation {number}.)", labels[number % len(labels)], "",
                0.7, 0.9, new_tokens, api_name="/chat")
        except Exception as error:  # noqa: BLE001 - counted and reported: the server must answer every one
            return f"{type(error).__name__}: {error}"
        return None if "tok/s" in stats else answer

    try:
        time.sleep(2)
        rows = [{"wave": "start", "seconds": 0.0, "errors": 0, **process_memory(process.pid),
                 "memory_line": last_memory_line(server_log, 0)}]
        log(f"waves: started, RSS {rows[0]['rss'] / 2**20:,.0f} MiB")
        for wave in range(waves):
            started = time.time()
            with ThreadPoolExecutor(parallel) as pool:
                errors = [e for e in pool.map(converse, range(wave * conversations, (wave + 1) * conversations)) if e]
            seconds = time.time() - started
            time.sleep(1.5)  # the last answers' states saved, one memory line written after the wave
            rows.append({"wave": "warm-up" if wave == 0 else str(wave), "seconds": seconds, "errors": len(errors),
                         "first_error": errors[0] if errors else None, **process_memory(process.pid),
                         "memory_line": last_memory_line(server_log, started + seconds)})
            log(f"waves: wave {wave + 1}/{waves} in {seconds:.0f} s, {len(errors)} errors, RSS "
                f"{rows[-1]['rss'] / 2**20:,.0f} MiB; {rows[-1]['memory_line']}")
        tracebacks = server_log.read_text().count("Traceback")
    finally:
        process.terminate()
        process.wait(timeout=30)
    return {"cpu": cpu_name(), "cores": usable_cpus(), "models": [Path(g).name for g in ggufs],
            "gguf_bytes": [Path(g).stat().st_size for g in ggufs], "conversations": conversations,
            "parallel": parallel, "new_tokens": new_tokens, "cache_mb": cache_mb, "max_sessions": max_sessions,
            "rows": rows,
            "tracebacks": tracebacks}


def render(section: dict) -> list[str]:
    """The docs/benchmarks.md section: a row per wave, then the verdict against the 5% target."""
    models = ", ".join(f"{name} ({size / 1e9:.2f} GB)" for name, size in zip(section["models"],
                                                                           section["gguf_bytes"]))
    lines = ["## Memory under a crowd: waves of conversations", "",
             f"Measured {section['measured']} on {section['cpu']}, {section['cores']} usable cores "
             f"(`python scripts/bench.py --sections waves`): `python space/app.py` serving {len(section['models'])} "
             f"catalog entries ({models}; Llama-3.2-1B-shaped, random weights) with `--cache-mb "
             f"{section['cache_mb']} --max-sessions {section['max_sessions']}`; each wave is "
             f"{section['conversations']} /chat conversations through gradio_client, {section['parallel']} at a "
             "time, each in a session of its own with its own message "
             f"({section['new_tokens']} new tokens), alternating between the models. Figures taken with the server "
             "idle after each wave; *anonymous* is the heap (what a leak grows), the rest of RSS is GGUF pages "
             "mapped from disk. The cache column is the Space's own memory line. The warm-up wave loads the models "
             "and fills both bounds, the state caches and the sessions (bounds smaller than one wave's states and "
             "sessions, so that the waves after it run full, as a Space does after its first hours).", "",
             "| after | wall | errors | RSS | anonymous | saved prompt states |", "|---|---|---|---|---|---|"]
    for row in section["rows"]:
        cache = row["memory_line"].split("): ", 1)[-1].split("; slots: ")[0]
        lines.append(f"| {row['wave']} | {row['seconds']:.0f} s | {row['errors']} | {row['rss'] / 2**20:,.0f} MiB | "
                     f"{row['anon'] / 2**20:,.0f} MiB | {cache} |")
    rss, anon = growth(section), growth(section, "anon")
    waves = len(section["rows"]) - 2
    verdict = "within" if rss <= GROWTH_TARGET else "**over**"
    lines += ["", f"After the warm-up, {waves} waves of {section['conversations']} conversations grew RSS by "
              f"**{rss:+.1%}** and the heap by {anon:+.1%}: {verdict} the {GROWTH_TARGET:.0%} target. "
              f"Tracebacks in the server's log: {section['tracebacks']}. The bounds are the owner's settings "
              "(`--cache-mb`/`SPACE_CACHE_MB`, default 512 MiB per model; `--max-sessions`/`SPACE_MAX_SESSIONS`, "
              "default 1,000 sessions, about 0.2 MiB each): the Space's memory is the GGUFs, their contexts and at "
              "most those, whatever the number of conversations. The Space also caps glibc's malloc arenas at 2 "
              "(common/machine.py): in an earlier run with the tiny models (caches off, 50 sessions, 10 waves of "
              "40), glibc's default of 8 arenas per core grew RSS by 26.5% with every wave adding to it, 2 arenas "
              "by 7.5%, flat from the fourth wave.", ""]
    return lines
