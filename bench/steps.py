"""The steps the benchmarks measure, each run by a worker process of its own (bench.harness): the export's merge,
convert and quantize, the naive merge, memory bandwidth, batch-1 generation, and the Space read by gradio_client.

    python scripts/bench.py --worker '{"step": "bandwidth", "repeats": 5}'   # what bench.harness.measured runs

Each step takes strings and numbers (its arguments travel as JSON) and returns its figures as a dict, or None.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import REPO, log
from bench.crowd import at_once
from bench.rates import RejectedRun, decoding_rate, eog_logit_bias
from common.llama_runtime import EXTRA_BUFFERS_ENV, open_gguf
from common.llama3 import PAD_ID
from common.machine import usable_cpus
from common.processes import ServerNotReady, free_port, wait_until_answers

# Six turns of one conversation (each message ≈ 40 tokens); the topic changes per repetition so that no
# repetition starts from the KV cache of the previous one.
TOPICS = ("rivers", "volcanoes", "public libraries", "bicycles", "tea", "glaciers", "lighthouses", "bees")
TURNS = (
    "I am preparing a short talk for a group of curious teenagers about {t}. Could you give me an outline with "
    "three main parts and one surprising fact for each part?",
    "Thanks. The second part feels a bit dry to me. How could I make it more vivid for the audience, maybe with an "
    "everyday comparison they already know?",
    "Good idea. Now suggest a question I could ask the group at the start, to get them thinking about {t} before I "
    "say anything, and explain why it works.",
    "Some of them will have read about {t} online and may bring up a myth. What are two common misconceptions, and "
    "how can I correct them politely?",
    "I have only ten minutes in total. Which part of the outline should I shorten, and what can I cut without "
    "losing the main message of the talk?",
    "Finally, write a closing paragraph of about four sentences that ties the talk together and leaves them with "
    "something to remember about {t}.",
)
PROMPT_TEXT = (  # for the ~100-token generation prompt; cut to length in prompt_ids()
    "Explain to a new engineer how a large language model produces text one token at a time on a CPU, why the "
    "speed of that loop depends mostly on how many bytes of weights must be read from memory for every token, "
    "how quantization to four bits changes that, what the key and value cache stores between steps, and why a "
    "longer conversation makes the first token of each answer slower unless the cache is reused. Use short "
    "paragraphs and one concrete example with numbers."
)


def step_merge(base: str, adapter: str, out: str) -> None:
    from export.merge import merge_lora_streaming

    merge_lora_streaming(Path(base), Path(adapter), Path(out), progress=False)


def step_naive_merge(base: str, adapter: str, out: str) -> None:
    """What most notebooks do: the whole model in memory, PEFT's merge_and_unload, save_pretrained."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)


def step_convert(merged: str, out: str, name: str) -> None:
    from export.gguf import convert_to_gguf, ensure_converter

    convert_to_gguf(Path(merged), Path(out), ensure_converter(log=lambda *_: None), name, "f16",
                    log=lambda *_: None, progress=False)


def step_quantize(source: str, out: str) -> None:
    from export.gguf import quantize

    quantize(Path(source), Path(out), "q4_k_m", progress=False)


def read_bandwidth(threads: int, gigabytes: float = 2.0, repeats: int = 5) -> float:
    """Bytes per second that `threads` threads read from a buffer far larger than the caches (numpy's max, a
    vectorised reduction that releases the GIL; the fastest of the reductions tried here)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    data = np.ones(int(gigabytes * 2**30) // 4, dtype=np.float32)
    parts = np.array_split(data, threads)
    times = []
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.max, parts))  # touch every page first
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(np.max, parts))
            times.append(time.perf_counter() - started)
    return data.nbytes / statistics.median(times)


def step_bandwidth(repeats: int) -> dict:
    return {f"threads_{threads}": read_bandwidth(threads, repeats=repeats) for threads in sorted({1, usable_cpus()})}


def prompt_ids(tokenizer, length: int) -> list[int]:
    """A chat-templated user message of about `length` tokens (generation prompt included)."""
    words = PROMPT_TEXT.split()
    ids = []
    for count in range(8, len(words) + 1):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": " ".join(words[:count])}],
                                            add_generation_prompt=True, tokenize=True, return_dict=False)
        if len(ids) >= length:
            break
    return list(ids)


def step_generate(kind: str, model: str, tokenizer: str, dtype: str | None, prompt_tokens: int,
                  new_tokens: int, threads: int | None = None, extra_buffers: str | None = None) -> dict:
    """One path's batch-1 greedy generation of exactly `new_tokens` tokens after a `prompt_tokens` chat prompt.

    Each path runs in a process of its own: PyTorch's OpenMP threads keep spinning for a while after each
    operation, and on 2 cores they would steal llama.cpp's time if both lived in one process. Tokens/s counts
    the tokens after the first over the time after the first (decoding); TTFT (reading the prompt) is separate.
    A short warm-up run comes first (allocations, kernel selection). extra_buffers: on or off forces llama.cpp's
    extra buffer types (common/llama_runtime.py) for this process."""
    import torch
    from transformers import AutoTokenizer

    ids = prompt_ids(AutoTokenizer.from_pretrained(tokenizer), prompt_tokens)
    loaded = {}
    if kind == "llama.cpp":
        if extra_buffers is not None:
            os.environ[EXTRA_BUFFERS_ENV] = extra_buffers
        llm = open_gguf(model, n_ctx=1024, n_threads=threads)
        loaded["extra_buffers"] = bool(llm.model_params.use_extra_bufts)  # what llama.cpp was given, not asked

        def run(count):
            llm.reset()  # forget the previous run's tokens: generate() would reuse them as a cached prefix
            times, started = [], time.perf_counter()
            # generate() yields every sampled token and never stops by itself (end of turn included).
            for _ in llm.generate(ids, temp=0.0):
                times.append(time.perf_counter())
                if len(times) == count:
                    break
            return decoding_rate(times, started, count)
    else:
        from transformers import AutoModelForCausalLM
        from transformers.generation.streamers import BaseStreamer

        torch.set_num_threads(threads or usable_cpus())
        hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()

        class Clock(BaseStreamer):
            def __init__(self):
                self.times, self.prompt_seen = [], False

            def put(self, value):
                if self.prompt_seen:
                    self.times.append(time.perf_counter())
                self.prompt_seen = True  # the first call carries the prompt

            def end(self):
                pass

        def run(count):
            clock, started = Clock(), time.perf_counter()
            with torch.inference_mode():
                hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=count, min_new_tokens=count, do_sample=False, streamer=clock,
                                  pad_token_id=PAD_ID)
            return decoding_rate(clock.times, started, count)

    run(4)
    return {"prompt_tokens": len(ids), **loaded, **run(new_tokens)}


def start_space(ggufs: list[str], folder: Path, stream_interval: float,
                *options: str) -> tuple[subprocess.Popen, str, Path]:
    """`python space/app.py` serving `ggufs` on a free port, with `options` after its own; (process, url, log)."""
    port = free_port()
    server_log = folder / f"space-server-{port}.log"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "space/app.py"), *[arg for gguf in ggufs for arg in ("--model", gguf)],
         "--host", "127.0.0.1", "--port", str(port), "--votes", str(folder / "votes.jsonl"),
         "--stream-interval", str(stream_interval), *options],
        cwd=REPO, stdout=server_log.open("w"), stderr=subprocess.STDOUT,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_answers(url, process, timeout=180, log=server_log)
    except ServerNotReady as error:
        process.kill()
        raise SystemExit(f"bench: the Space did not start: {error}") from None
    return process, url, server_log


def step_space(gguf: str, repeats: int, new_tokens: int, turns: int, turn_tokens: int, folder: str,
               intervals: list[float], pause_s: float = 2.0, crowd: int = 4) -> dict:
    """The Space's server as users start it (one per streaming interval), read by gradio_client, against the
    same GGUF through raw llama-cpp-python with the engine's settings; one at a time, in turn."""
    from gradio_client import Client

    servers = {}
    try:
        for interval in intervals:
            servers[interval] = start_space([gguf], Path(folder), interval)[:2]
        label = Path(gguf).stem
        # Raw llama-cpp-python as space/engine.py sets it up and calls it, end-of-generation tokens suppressed so
        # that every answer is `new_tokens` long (bench/rates.py); greedy. (The Space's greedy answers are not always
        # raw's token for token: llama.cpp's sums depend on how the prompt was split into batches, and random weights
        # sit on near-ties; the speed counts only answers of all the tokens asked.)
        raw = open_gguf(gguf, n_ctx=4096)
        no_end = eog_logit_bias(raw)

        def raw_run(message: str) -> tuple[dict, str]:
            """Figures and answer text; the answer is `new_tokens` long (finish reason "length")."""
            times, started, finish, text = [], time.perf_counter(), None, ""
            for chunk in raw.create_chat_completion([{"role": "user", "content": message}], stream=True,
                                                    temperature=0.0, top_p=1.0, max_tokens=new_tokens,
                                                    logit_bias=no_end):
                choice = chunk["choices"][0]
                if choice["delta"].get("content"):
                    times.append(time.perf_counter())
                    text += choice["delta"]["content"]
                finish = choice.get("finish_reason") or finish
            # A piece held back for UTF-8 streams no content: "length" says all `new_tokens` were generated.
            return decoding_rate(times, started, new_tokens, new_tokens if finish == "length" else len(times)), text

        def space_run(client, message: str, max_tokens: int, full: bool = False) -> dict:
            """Client-side: when the first and last streamed updates arrive; the token count from the Space's own
            stats line (the engine counts sampled tokens, bar the end of turn). The Space's API cannot suppress
            end-of-turn: with `full`, a speed comes only from an answer of all `max_tokens` tokens (RejectedRun
            otherwise, and another prompt is tried); without it, TTFT and counts only."""
            times, started = [], time.perf_counter()
            job = client.submit(message, label, "", 0.0, 1.0, max_tokens, api_name="/chat")
            last = ""
            for answer, *_ in job:
                if answer and answer != last:
                    times.append(time.perf_counter())
                    last = answer
            answer, stats = job.result()  # the API's history is a gr.State: not sent to clients
            tokens = int(re.search(r"(\d+) tokens?", stats).group(1))
            server_rate = re.search(r"([\d.]+) tok/s", stats)
            read = re.search(r"read ([\d,]+) of ([\d,]+) prompt tokens", stats)
            figures = {"ttft_s": times[0] - started, "tokens": tokens, "updates": len(times),
                       "server_ttft_s": float(re.search(r"TTFT ([\d.]+) s", stats).group(1)),
                       "prompt_read": int(read.group(1).replace(",", "")) if read else None,
                       "prompt_tokens": int(read.group(2).replace(",", "")) if read else None}
            if not full:
                return figures
            if tokens != max_tokens:
                raise RejectedRun(f"the Space's answer ended after {tokens} tokens, short of the {max_tokens} asked")
            rate = decoding_rate(times, started, max_tokens, max_tokens)["tokens_per_s"]
            return {**figures, "tokens_per_s": rate,
                    "server_tokens_per_s": float(server_rate.group(1)) if server_rate else None}

        message = TURNS[0].format(t="memory bandwidth")
        raw_run("Hello")  # warm-up, every path
        for _, url in servers.values():
            space_run(Client(url, verbose=False), "Hello", 16)
        throughput = {"raw": [], **{f"space {interval}": [] for interval in intervals}}
        rejected, attempt = [], 0
        for repeat in range(repeats):
            while True:  # a new prompt each time, the same for every path; another one if a path's run is rejected
                take = f", take {attempt // len(TOPICS) + 1}" if attempt >= len(TOPICS) else ""
                prompt = f"({TOPICS[attempt % len(TOPICS)]}{take}) {message}"
                attempt += 1
                try:
                    raw_figures, _ = raw_run(prompt)
                    taken = {"raw": raw_figures, **{f"space {interval}": space_run(
                        Client(url, verbose=False), prompt, new_tokens, full=True)
                        for interval, (_, url) in servers.items()}}
                    break
                except RejectedRun as why:
                    rejected.append({"prompt": prompt, "reason": str(why)})
                    log(f"space {repeat + 1}/{repeats}: run rejected ({why}); another prompt")
                    if len(rejected) > 2 * repeats:
                        raise RejectedRun(f"{len(rejected)} runs rejected, the last because {why}: this model "
                                          f"does not answer {new_tokens} tokens through the Space") from None
            for path, run in taken.items():
                throughput[path].append(run)
            log(f"space {repeat + 1}/{repeats}: " + ", ".join(f"{path} {runs[-1]['tokens_per_s']:.2f} tok/s"
                                                              for path, runs in throughput.items()))
        conversations = []
        _, url = servers[intervals[0]]
        for repeat in range(repeats):
            client, topic = Client(url, verbose=False), TOPICS[(repeat + 3) % len(TOPICS)]
            conversation = []
            for turn in range(turns):
                if turn:
                    time.sleep(pause_s)  # a user reads the answer and types the next message
                # Time to first token is what a conversation measures: its answers may end early (no speed).
                conversation.append(space_run(client, TURNS[turn].format(t=topic), turn_tokens))
            conversations.append(conversation)
            log(f"space conversation {repeat + 1}/{repeats}: TTFT by turn "
                + ", ".join(f"{turn['ttft_s']:.2f}" for turn in conversation) + " s")
        # A crowd through the Space: `crowd` gradio_client users sending different prompts at the same moment.
        crowd_runs = []
        for repeat in range(repeats):
            def user(index: int, client) -> dict:
                started = time.perf_counter()
                figures = space_run(client, f"({TOPICS[(index + repeat) % len(TOPICS)]}) {message}", new_tokens)
                return {**figures, "wall_s": time.perf_counter() - started}

            results, wall = at_once(user, crowd, prepare=lambda index: Client(url, verbose=False))
            ttfts = sorted(r["ttft_s"] for r in results)
            crowd_runs.append({"users": crowd, "ttft_p50_s": statistics.median(ttfts), "ttft_p95_s": ttfts[-1],
                               "aggregate_tokens_per_s": sum(r["tokens"] for r in results) / wall,
                               "tokens": [r["tokens"] for r in results]})
            log(f"space crowd {repeat + 1}/{repeats}: {crowd} users, TTFT p50 {crowd_runs[-1]['ttft_p50_s']:.2f} s, "
                f"p95 {ttfts[-1]:.2f} s, {crowd_runs[-1]['aggregate_tokens_per_s']:.1f} tok/s in all")
        return {"new_tokens": new_tokens, "turn_tokens": turn_tokens, "intervals": intervals, "pause_s": pause_s,
                "throughput": throughput, "rejected": rejected, "conversations": conversations, "crowd": crowd_runs}
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=30)


# The steps a worker can run (bench.harness.worker), by the name measured() is given.
WORKER_STEPS = dict(merge=step_merge, naive_merge=step_naive_merge, convert=step_convert, quantize=step_quantize,
                    bandwidth=step_bandwidth, generate=step_generate, space=step_space)
