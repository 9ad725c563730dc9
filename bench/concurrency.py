"""N users at once: the Space's in-process engine against llama.cpp's llama-server with one slot per user.

    from bench import concurrency
    section = concurrency.measure(Path("1b-Q4_K_M.gguf"), users=(1, 2, 4, 8), new_tokens=128, repeats=1)
    lines = concurrency.render(section)

Every user sends a different prompt at the same moment (a barrier) and reads a streamed answer of `new_tokens`
tokens. The engine (space.engine.Engine, as space/app.py runs it) answers one request per model at a time, so user
k waits for the k-1 before; llama-server (scripts/serve_openai.py's command, `--parallel N`) decodes the N
conversations together in one batch, reading the weights once per step for all of them, and is driven through
space.remote.RemoteModel, the client the Space uses for a server catalog entry. Figures per user: time to first
token from the common start, decoding tokens/s after the first token; aggregate: all tokens / the wall time.
"""

from __future__ import annotations

import statistics
import subprocess
import threading
import time
from pathlib import Path

from bench import log
from bench.rates import RejectedRun
from common.machine import cpu_name, usable_cpus

PROMPTS = [
    "Explain why the sky is blue.", "Write a haiku about trains.", "What is a hash table?",
    "Give me three tips for a job interview.", "How do vaccines work?", "Summarize the plot of Hamlet.",
    "What is the difference between TCP and UDP?", "Suggest a name for a bakery.",
]


def _run_users(answer, users: int) -> dict:
    """`answer(prompt, started)` on `users` threads released together; per-user and aggregate figures."""
    barrier, results = threading.Barrier(users + 1), [None] * users

    def user(index: int) -> None:
        barrier.wait()
        started = time.perf_counter()
        results[index] = (answer(PROMPTS[index % len(PROMPTS)], started), started, time.perf_counter())

    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    for thread in threads:
        thread.start()
    barrier.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    replies = [reply for reply, _, _ in results]
    errors = [reply.error for reply in replies if reply.error]
    if errors:
        raise RuntimeError(f"a user's answer failed: {errors[0]}")
    # Speeds only from answers that ran to the tokens asked (bench/rates.py): a short one would inflate them.
    if short := [reply.finish_reason for reply in replies if reply.finish_reason != "length"]:
        raise RejectedRun(f"{len(short)} of {users} answers ended before the tokens asked (finish reason "
                          f"{short[0]!r}): no speed comes from this run")
    wall = max(end for _, _, end in results) - began
    ttfts = sorted(reply.ttft_s for reply in replies)
    return {"users": users, "wall_s": wall, "tokens": sum(r.tokens for r in replies),
            "aggregate_tokens_per_s": sum(r.tokens for r in replies) / wall,
            "per_user_tokens_per_s": statistics.median(r.tokens_per_s or 0.0 for r in replies),
            "ttft_p50_s": statistics.median(ttfts), "ttft_p95_s": _percentile(ttfts, 0.95)}


def _percentile(sorted_values: list[float], share: float) -> float:
    """Nearest-rank percentile (with 8 users, p95 is the slowest).

    >>> _percentile([1.0, 2.0, 3.0, 4.0], 0.95), _percentile([1.0, 2.0, 3.0, 4.0], 0.5)
    (4.0, 2.0)
    """
    rank = max(1, -(-int(share * 100) * len(sorted_values) // 100))
    return sorted_values[rank - 1]


def _engine_path(gguf: Path, new_tokens: int):
    from space.catalog import catalog_from_paths
    from space.engine import Engine
    from space.replies import Sampling

    engine = Engine(catalog_from_paths([str(gguf)]), n_ctx=4096)
    sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=new_tokens)

    def answer(prompt: str, started: float):
        reply = None
        for reply in engine.stream_chat(engine.labels[0], prompt, sampling=sampling):
            pass
        reply.ttft_s = reply.ttft_s if reply.ttft_s is not None else time.perf_counter() - started
        return reply

    list(engine.stream_chat(engine.labels[0], "Hi", sampling=Sampling(max_new_tokens=16)))  # load and warm up
    return answer


def _server_path(base_url: str, new_tokens: int):
    from space.catalog import ModelSpec
    from space.remote import RemoteModel
    from space.replies import Sampling

    remote = RemoteModel(ModelSpec("llama-server", base_url=base_url, model="bench"))
    sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=new_tokens)

    def answer(prompt: str, started: float):
        return list(remote.stream([{"role": "user", "content": prompt}], sampling, None, started))[-1]

    answer("Hi", time.perf_counter())  # warm up
    return answer


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_llama_server(gguf: Path, slots: int, run):
    """`run(base_url)` against a llama-server with `slots` slots of 1,024 tokens, stopped afterwards."""
    from space.servers import build_llama_server, llama_server_command, wait_until_ready

    port = _free_port()
    argv = llama_server_command(build_llama_server(log=log), gguf, port=port, slots=slots, ctx_per_slot=1024,
                                alias="bench")
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        wait_until_ready(base_url, process, timeout=300)
        return run(base_url)
    finally:
        process.terminate()
        process.wait(timeout=60)


def measure(gguf: Path, users: tuple[int, ...] = (1, 2, 4, 8), new_tokens: int = 128, repeats: int = 1) -> dict:
    """Both paths at each number of users, `repeats` times, the two paths in turn (noise hits both alike)."""
    from space.servers import build_llama_server

    build_llama_server(log=log)  # before any timing: once per machine
    engine = _engine_path(gguf, new_tokens)
    runs = {"engine": {n: [] for n in users}, "llama-server": {n: [] for n in users}}
    for repeat in range(repeats):
        for n in users:
            runs["engine"][n].append(_run_users(engine, n))
            runs["llama-server"][n].append(
                _with_llama_server(gguf, n, lambda url, n=n: _run_users(_server_path(url, new_tokens), n)))
            for path in runs:
                figures = runs[path][n][-1]
                log(f"concurrency {repeat + 1}/{repeats} {path}, {n} users: {figures['aggregate_tokens_per_s']:.1f} "
                    f"tok/s in all, {figures['per_user_tokens_per_s']:.1f} per user, TTFT p50 "
                    f"{figures['ttft_p50_s']:.2f} s, p95 {figures['ttft_p95_s']:.2f} s")
    return {"cpu": cpu_name(), "cores": usable_cpus(), "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size,
            "new_tokens": new_tokens, "runs": {path: {str(n): r for n, r in by_n.items()} for path, by_n in runs.items()}}


def medians(section: dict) -> dict:
    """{path: {users: {figure: median over repeats}}}."""
    keys = ("aggregate_tokens_per_s", "per_user_tokens_per_s", "ttft_p50_s", "ttft_p95_s")
    return {path: {int(n): {key: statistics.median(r[key] for r in runs) for key in keys}
                   for n, runs in by_n.items()} for path, by_n in section["runs"].items()}


def render(section: dict) -> list[str]:
    """The docs/benchmarks.md section: one row per path and number of users, then what the figures say."""
    figures = medians(section)
    lines = ["## N users at once: the Space's engine vs llama-server", "",
             f"Measured {section['measured']} on {section['cpu']}, {section['cores']} usable cores "
             f"(`python scripts/bench.py --sections concurrency`): {section['gguf']} "
             f"({section['gguf_bytes'] / 1e9:.2f} GB, Llama-3.2-1B-shaped, random weights), every user sending a "
             f"different prompt at the same moment and streaming {section['new_tokens']} new tokens (temperature "
             "0.7). *engine*: space.engine.Engine as the Space runs it, one answer at a time; *llama-server*: "
             "`scripts/serve_openai.py` (llama.cpp's server, built from the pinned llama-cpp-python's llama.cpp) "
             "with one slot per user, read through the Space's OpenAI client. Medians over repetitions.", "",
             "| users | path | tokens/s, all users | tokens/s per user | TTFT p50 | TTFT p95 |",
             "|---|---|---|---|---|---|"]
    for n in sorted(figures["engine"]):
        for path in ("engine", "llama-server"):
            f = figures[path][n]
            lines.append(f"| {n} | {path} | **{f['aggregate_tokens_per_s']:.1f}** | {f['per_user_tokens_per_s']:.1f} "
                         f"| {f['ttft_p50_s']:.2f} s | {f['ttft_p95_s']:.2f} s |")
    most = max(figures["engine"])
    engine, server = figures["engine"][most], figures["llama-server"][most]
    single = figures["engine"][min(figures["engine"])]["aggregate_tokens_per_s"]
    lines += ["", f"With {most} users, llama-server serves **{server['aggregate_tokens_per_s'] / engine['aggregate_tokens_per_s']:.1f}×** "
              f"the engine's tokens/s in all, and the slowest user's first token comes after "
              f"{server['ttft_p95_s']:.1f} s instead of {engine['ttft_p95_s']:.1f} s; one user alone gets "
              f"{single:.1f} tok/s from the engine. " + switch_advice(figures), ""]
    return lines


def switch_advice(figures: dict) -> str:
    """When a Space owner should put llama-server behind the Space, read from the figures."""
    better = [n for n in sorted(figures["engine"]) if n > 1 and figures["llama-server"][n]["ttft_p95_s"]
              < figures["engine"][n]["ttft_p95_s"] and figures["llama-server"][n]["aggregate_tokens_per_s"]
              >= figures["engine"][n]["aggregate_tokens_per_s"]]
    if not better:
        return ("Here llama-server did not beat the engine at any number of users: keep the in-process engine.")
    return (f"From {better[0]} users at once, llama-server gives every user a sooner first token and more tokens "
            "in all: a Space that regularly has that many people chatting at the same time should serve its "
            "models from llama-server (README: Scaling past one machine); below that, the in-process engine is "
            "as good and needs no second process.")
