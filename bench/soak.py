"""A soak: `python space/app.py` under a changing crowd for half an hour, as a busy Space lives.

    from bench import soak
    section = soak.measure(Path("1b-Q4_K_M.gguf"), Path("work/soak"), minutes=30)
    lines = soak.render(section)

Users come and go through gradio_client, each in a session of its own, the crowd's size following a cycle from 1
to `peak` users and back every 6 minutes. Each user does one thing, drawn from a fixed-seed mix: a conversation of
1 to 4 turns (/chat), a long prompt (≈1,500 tokens of pasted text), a compare (/compare), an answer stopped with
the Stop button (/stop_chat after its first tokens) or a tab closed mid-answer (the job cancelled). An error is any
answer without the statistics line, any client exception, or a Stop that did not end its answer. Every 10 s: the
server's RSS, and the Space's memory line (saved states, busy slots, the line). The first `warmup_minutes` warm up
(models loaded, the state cache and Gradio's sessions filled); afterwards RSS must stay within +5% of its value at
the end of the warm-up, the log must hold no traceback, and when the crowd is gone every slot must be free.
"""

from __future__ import annotations

import random
import re
import threading
import time
from pathlib import Path

from bench.waves import last_memory_line, process_memory
from common.machine import cpu_name, usable_cpus

ACTIONS = ("conversation", "conversation", "conversation", "long prompt", "compare", "stop", "close tab")
PASTE = ("The quarterly report covers revenue, costs, staffing and the outlook for the next year. " * 90)[:7000]
_BUSY = re.compile(r"(\d+)/(\d+) busy, (\d+) waiting")


def _crowd_size(elapsed_s: float, peak: int, period_s: float = 360.0) -> int:
    """Users wanted at `elapsed_s`: up from 1 to `peak` and down again every `period_s`.

    >>> [_crowd_size(t, 8) for t in (0, 90, 180, 270, 359)]
    [1, 4, 8, 4, 1]
    """
    phase = (elapsed_s % period_s) / period_s
    return max(1, round(1 + (peak - 1) * (1 - abs(2 * phase - 1))))


def _act(url: str, labels: list[str], action: str, rng: random.Random, new_tokens: int) -> tuple[str | None, int]:
    """One user's visit; (its error, if any, and the requests it made)."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    label = rng.choice(labels)
    try:
        if action in ("conversation", "long prompt"):
            turns = rng.randint(1, 4) if action == "conversation" else 1
            for turn in range(turns):  # the session's history stays in the Space (gr.State), as a browser's does
                text = (f"Question {turn + 1}: explain topic {rng.randint(0, 999)} simply." if action == "conversation"
                        else f"Summarize this: {PASTE}")
                answer, stats = client.predict(text, label, "", 0.7, 0.9, new_tokens, api_name="/chat")
                if "tok/s" not in stats and "token" not in stats:
                    return f"{action} turn {turn + 1} without statistics: {str(answer)[:200]}", turn + 1
            return None, turns
        if action == "compare":
            result = client.predict(f"Compare: topic {rng.randint(0, 999)}", labels[0], labels[-1], "", 0.7, 0.9,
                                    new_tokens, False, False, api_name="/compare")
            return (None if "tok/s" in str(result[2]) and "tok/s" in str(result[3])
                    else f"compare without statistics: {str(result)[:200]}"), 1
        job = client.submit("Write a very long story about a lighthouse keeper.", label, "", 1.0, 0.9, 1024,
                            api_name="/chat")
        deadline = time.time() + 120
        while not any(update and update[0] for update in job.outputs()) and time.time() < deadline:
            time.sleep(0.2)
        if action == "stop":
            client.predict(api_name="/stop_chat")
            answer, _ = job.result(timeout=60)
            return (None if answer else "stopped answer came back empty"), 2
        job.cancel()  # a closed tab
        return None, 1
    except Exception as error:  # noqa: BLE001 - counted and reported: the Space must answer every request
        return f"{action}: {type(error).__name__}: {str(error)[:200]}", 1


def measure(gguf: Path, folder: Path, minutes: float = 30, peak: int = 8, warmup_minutes: float = 5,
            new_tokens: int = 48, slots: int = 4, seed: int = 0) -> dict:
    from bench.steps import start_space

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for index in range(2):  # two catalog entries on the file: chat and compare both have two models
        entry = folder / f"{'AB'[index]}-{gguf.name}"
        entry.unlink(missing_ok=True)
        entry.symlink_to(gguf.resolve())
        entries.append(entry)
    labels = [entry.stem for entry in entries]
    process, url, server_log = start_space([str(entry) for entry in entries], folder, 0.1, "--slots", str(slots),
                                           "--cache-mb", "256", "--max-sessions", "200", "--memory-log-interval", "5")
    rng, lock = random.Random(seed), threading.Lock()
    counts = {action: 0 for action in ACTIONS}
    errors, requests, samples, active = [], [0], [], []
    started = time.time()

    def visit(action: str, user_seed: int) -> None:
        error, made = _act(url, labels, action, random.Random(user_seed), new_tokens)
        with lock:
            requests[0] += made
            if error:
                errors.append(error)

    try:
        next_sample = 0.0
        while (elapsed := time.time() - started) < minutes * 60:
            active[:] = [thread for thread in active if thread.is_alive()]
            while len(active) < _crowd_size(elapsed, peak):
                action = rng.choice(ACTIONS)
                counts[action] += 1
                thread = threading.Thread(target=visit, args=(action, rng.randrange(2**31)), daemon=True)
                thread.start()
                active.append(thread)
            if elapsed >= next_sample:
                samples.append({"minute": elapsed / 60, "users": len(active), **process_memory(process.pid)})
                next_sample += 10
            time.sleep(0.5)
        for thread in active:
            thread.join(300)
        time.sleep(6)  # a memory line written with the crowd gone
        end_line = last_memory_line(server_log, time.time() - 5)
        end = process_memory(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
    server_text = server_log.read_text()
    warm = [s for s in samples if s["minute"] >= warmup_minutes]
    baseline = warm[0]["rss"] if warm else samples[-1]["rss"]
    busy = [(int(b), int(w)) for b, _, w in _BUSY.findall(end_line)]
    return {"cpu": cpu_name(), "cores": usable_cpus(), "gguf": gguf.name, "minutes": minutes, "peak": peak,
            "slots": slots, "new_tokens": new_tokens, "warmup_minutes": warmup_minutes, "visits": counts,
            "requests": requests[0], "errors": len(errors), "first_errors": errors[:5],
            "tracebacks": server_text.count("Traceback"), "samples": samples, "rss_after_warmup": baseline,
            "rss_end": end["rss"], "rss_max_after_warmup": max((s["rss"] for s in warm), default=baseline),
            "end_memory_line": end_line, "slots_free_at_end": bool(busy) and all(b == 0 and w == 0 for b, w in busy)}


def render(section: dict) -> list[str]:
    growth = section["rss_end"] / section["rss_after_warmup"] - 1
    peak_growth = section["rss_max_after_warmup"] / section["rss_after_warmup"] - 1
    mib = 2**20
    visits = ", ".join(f"{count} {action}" for action, count in section["visits"].items())
    return ["## Soak: half an hour of a changing crowd", "",
            f"Measured {section['measured']} on {section['cpu']}, {section['cores']} usable cores "
            f"(`python scripts/bench.py --sections soak`): `python space/app.py --slots {section['slots']}` serving "
            f"{section['gguf']} as two catalog entries for {section['minutes']:.0f} minutes, 1 to {section['peak']} "
            "gradio_client users at once (the crowd grows and shrinks every 6 minutes), each a session of its own "
            f"doing one thing: {visits} ({section['requests']} requests; answers of {section['new_tokens']} tokens, "
            "Stop and closed tabs on 1,024-token answers).", "",
            "| errors | tracebacks in the log | RSS after warm-up | RSS at the end | highest RSS after warm-up | "
            "slots free at the end |", "|---|---|---|---|---|---|",
            f"| **{section['errors']}** | **{section['tracebacks']}** | {section['rss_after_warmup'] / mib:,.0f} MiB | "
            f"{section['rss_end'] / mib:,.0f} MiB (**{growth:+.1%}**) | {section['rss_max_after_warmup'] / mib:,.0f} MiB "
            f"({peak_growth:+.1%}) | **{'yes' if section['slots_free_at_end'] else 'no'}** |", "",
            f"The Space's last memory line: `{section['end_memory_line']}`."
            + (f" First errors: {'; '.join(section['first_errors'])}." if section["first_errors"] else ""), ""]
