"""N users at once: the Space's batched engine against llama.cpp's llama-server, the same GGUF and slots.

    from bench import concurrency
    section = concurrency.measure(Path("1b-Q4_K_M.gguf"), users=(1, 2, 4, 8), new_tokens=128, repeats=1)
    lines = concurrency.render(section)

Every user sends a different prompt at the same moment (a barrier) and reads a streamed answer of `new_tokens`
tokens. Both paths run as servers with one slot per user and 1,024 tokens per slot, and are read through
space.remote.RemoteModel, the client the Space uses for a server catalog entry: *engine* is the Space's own engine
(space/batching.py) behind space/openai_server.py, what `scripts/serve_openai.py --engine llama-cpp-python` starts;
*llama-server* is llama.cpp's own server (scripts/serve_openai.py's default). Figures per user: time to first token
from the common start, decoding tokens/s after the first token, the gaps between streamed tokens; aggregate: all
tokens / the wall time; memory: the server process's peak RSS (VmHWM).
"""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

from bench import log
from bench.crowd import at_once
from bench.rates import RejectedRun
from common.processes import free_port
from common.machine import cpu_name, usable_cpus

REPO = Path(__file__).resolve().parents[1]

PROMPTS = [
    "Explain why the sky is blue.", "Write a haiku about trains.", "What is a hash table?",
    "Give me three tips for a job interview.", "How do vaccines work?", "Summarize the plot of Hamlet.",
    "What is the difference between TCP and UDP?", "Suggest a name for a bakery.",
]


def _run_users(answer, users: int) -> dict:
    """`answer(prompt, started)` on `users` threads released together; per-user and aggregate figures. `answer`
    returns (its final Reply, when each streamed update arrived)."""
    def user(index: int, _) -> tuple:
        started = time.perf_counter()
        return answer(PROMPTS[index % len(PROMPTS)], started), started, time.perf_counter()

    results, wall = at_once(user, users)
    replies = [reply for (reply, _), _, _ in results]
    gaps = sorted(b - a for (_, arrivals), _, _ in results for a, b in zip(arrivals, arrivals[1:]))
    errors = [reply.error for reply in replies if reply.error]
    if errors:
        raise RuntimeError(f"a user's answer failed: {errors[0]}")
    # Speeds only from answers that ran to the tokens asked (bench/rates.py): a short one would inflate them.
    if short := [reply.finish_reason for reply in replies if reply.finish_reason != "length"]:
        raise RejectedRun(f"{len(short)} of {users} answers ended before the tokens asked (finish reason "
                          f"{short[0]!r}): no speed comes from this run")
    ttfts = sorted(reply.ttft_s for reply in replies)
    return {"users": users, "wall_s": wall, "tokens": sum(r.tokens for r in replies),
            "aggregate_tokens_per_s": sum(r.tokens for r in replies) / wall,
            "per_user_tokens_per_s": statistics.median(r.tokens_per_s or 0.0 for r in replies),
            "ttft_p50_s": statistics.median(ttfts), "ttft_p95_s": _percentile(ttfts, 0.95),
            "gap_p95_s": _percentile(gaps, 0.95) if gaps else None}


def _percentile(sorted_values: list[float], share: float) -> float:
    """Nearest-rank percentile (with 8 users, p95 is the slowest).

    >>> _percentile([1.0, 2.0, 3.0, 4.0], 0.95), _percentile([1.0, 2.0, 3.0, 4.0], 0.5)
    (4.0, 2.0)
    """
    rank = max(1, -(-int(share * 100) * len(sorted_values) // 100))
    return sorted_values[rank - 1]


def _server_path(base_url: str, new_tokens: int):
    from space.catalog import ModelSpec
    from space.remote import RemoteModel
    from space.replies import Sampling

    remote = RemoteModel(ModelSpec("llama-server", base_url=base_url, model="bench"))
    sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=new_tokens)

    def answer(prompt: str, started: float):
        arrivals, reply = [], None
        for reply in remote.stream([{"role": "user", "content": prompt}], sampling, None, started):
            if not reply.done:
                arrivals.append(time.perf_counter())
        return reply, arrivals

    answer("Hi", time.perf_counter())  # warm up
    return answer


def peak_rss_bytes(pid: int) -> int | None:
    """A process's peak resident memory (VmHWM), or None where /proc does not say."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _with_server(path: str, gguf: Path, slots: int, run) -> dict:
    """`run(base_url)` against `path`'s server with `slots` slots of 1,024 tokens, stopped afterwards; its figures
    with the server's peak RSS."""
    from space.openai_server import batched_server_command
    from space.servers import build_llama_server, llama_server_command, wait_until_ready

    port = free_port()
    if path == "llama-server":
        argv = llama_server_command(build_llama_server(log=log), gguf, port=port, slots=slots, ctx_per_slot=1024,
                                    alias="bench")
    else:
        argv = batched_server_command(gguf, port=port, ctx=1024, slots=slots, alias="bench")
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        wait_until_ready(base_url, process, timeout=300)
        figures = run(base_url)
        return {**figures, "peak_rss_bytes": peak_rss_bytes(process.pid)}
    finally:
        process.terminate()
        process.wait(timeout=60)


PATHS = ("engine", "llama-server")


def measure(gguf: Path, users: tuple[int, ...] = (1, 2, 4, 8), new_tokens: int = 128, repeats: int = 1) -> dict:
    """Both paths at each number of users, `repeats` times, the two paths in turn (noise hits both alike)."""
    from space.servers import build_llama_server

    build_llama_server(log=log)  # before any timing: once per machine
    runs = {path: {n: [] for n in users} for path in PATHS}
    for repeat in range(repeats):
        for n in users:
            for path in PATHS:
                runs[path][n].append(_with_server(path, gguf, n, lambda url, n=n: _run_users(
                    _server_path(url, new_tokens), n)))
                figures = runs[path][n][-1]
                log(f"concurrency {repeat + 1}/{repeats} {path}, {n} users: {figures['aggregate_tokens_per_s']:.1f} "
                    f"tok/s in all, {figures['per_user_tokens_per_s']:.1f} per user, TTFT p50 "
                    f"{figures['ttft_p50_s']:.2f} s, p95 {figures['ttft_p95_s']:.2f} s, gap p95 "
                    f"{figures['gap_p95_s'] or 0:.3f} s, peak RSS {(figures['peak_rss_bytes'] or 0) / 2**20:,.0f} MiB")
    return {"cpu": cpu_name(), "cores": usable_cpus(), "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size,
            "new_tokens": new_tokens, "runs": {path: {str(n): r for n, r in by_n.items()} for path, by_n in runs.items()}}


def medians(section: dict) -> dict:
    """{path: {users: {figure: median over repeats}}}."""
    keys = ("aggregate_tokens_per_s", "per_user_tokens_per_s", "ttft_p50_s", "ttft_p95_s", "gap_p95_s",
            "peak_rss_bytes")
    return {path: {int(n): {key: _median([r.get(key) for r in runs]) for key in keys}
                   for n, runs in by_n.items()} for path, by_n in section["runs"].items()}


def _median(values: list) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def render(section: dict) -> list[str]:
    """The docs/benchmarks.md section: one row per path and number of users, then what the figures say."""
    figures = medians(section)
    lines = ["## N users at once: the Space's batched engine vs llama-server", "",
             f"Measured {section['measured']} on {section['cpu']}, {section['cores']} usable cores "
             f"(`python scripts/bench.py --sections concurrency`): {section['gguf']} "
             f"({section['gguf_bytes'] / 1e9:.2f} GB, Llama-3.2-1B-shaped, random weights), every user sending a "
             f"different prompt at the same moment and streaming {section['new_tokens']} new tokens (temperature "
             "0.7). *engine*: the Space's own engine (space/batching.py: continuous batching on llama-cpp-python's "
             "low-level API) behind `scripts/serve_openai.py --engine llama-cpp-python`; *llama-server*: "
             "`scripts/serve_openai.py` (llama.cpp's server, built from the pinned llama-cpp-python's llama.cpp). "
             "Both with one slot per user of 1,024 tokens, read through the Space's OpenAI client. Gap: time between "
             "two streamed tokens of one user. Medians over repetitions.", "",
             "| users | path | tokens/s, all users | runs | tokens/s per user | TTFT p50 | TTFT p95 | runs | gap p95 | "
             "peak RSS |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in sorted(figures["engine"]):
        for path in PATHS:
            f, runs = figures[path][n], section["runs"][path][str(n)]
            rss = f"{f['peak_rss_bytes'] / 2**20:,.0f} MiB" if f.get("peak_rss_bytes") else "n/a"
            gap = f"{f['gap_p95_s']:.3f} s" if f.get("gap_p95_s") is not None else "n/a"
            lines.append(f"| {n} | {path} | **{f['aggregate_tokens_per_s']:.1f}** | "
                         + ", ".join(f"{r['aggregate_tokens_per_s']:.1f}" for r in runs)
                         + f" | {f['per_user_tokens_per_s']:.1f} | {f['ttft_p50_s']:.2f} s | {f['ttft_p95_s']:.2f} s | "
                         + ", ".join(f"{r['ttft_p95_s']:.2f}" for r in runs) + f" | {gap} | {rss} |")
    lines += ["", verdict(figures)]
    repeats = len(section["runs"]["engine"][str(min(figures["engine"]))])
    if repeats > 1:  # each repetition on its own: the two paths ran side by side within it
        lines += ["", "Repetition by repetition: " + "; ".join(
            f"{index + 1}: " + verdict({path: {int(n): runs[index] for n, runs in by_n.items()}
                                        for path, by_n in section["runs"].items()}).split(": ", 1)[1]
            for index in range(repeats))]
    lines.append("")
    return lines


def verdict(figures: dict) -> str:
    """The targets (p95 first token no later than llama-server's, tokens/s in all no lower, at 2+ users), read from
    the figures: met or missed, by how much."""
    parts = []
    for n in sorted(n for n in figures["engine"] if n > 1):
        engine, server = figures["engine"][n], figures["llama-server"][n]
        ratio = engine["aggregate_tokens_per_s"] / server["aggregate_tokens_per_s"]
        ttft = engine["ttft_p95_s"] - server["ttft_p95_s"]
        met = ratio >= 1 and ttft <= 0
        parts.append(f"{n} users: {'**met**' if met else '**missed**'} (tokens/s in all {ratio:.2f}× llama-server's, "
                     f"p95 first token {'+' if ttft > 0 else '−'}{abs(ttft):.2f} s)")
    return "Targets (engine at least llama-server's tokens/s in all, p95 first token no later): " + "; ".join(parts) + "."
