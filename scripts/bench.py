#!/usr/bin/env python
"""Our speed and memory against the alternatives, measured side by side on this machine in one run.

    python scripts/bench.py                                # everything: about 30 minutes on 2 cores
    python scripts/bench.py --sizes 1b --repeats 2         # quicker
    python scripts/bench.py --sections generation,space    # some sections; the others keep their last figures

Writes docs/benchmarks.md (and the table in README.md between its benchmark markers), docs/benchmarks.png and
docs/benchmarks.json (every raw figure).

The models are Llama-3.2-1B- and 3B-shaped, with random bf16 weights written tensor by tensor into safetensors
files (the full model never exists in memory), Meta's real tokenizer, and a random rank-16 LoRA adapter on every
projection, which is what the 1b/3b presets train. Random weights cost the same to store, move and multiply as
trained ones, so the speeds, memory and file sizes are those of the real models; only the words are meaningless.
They are built once into --work (a few minutes; 21 GB of scratch disk with both sizes, 34 GB at the peak of the
export section).

Sections, each measurement repeated, median reported:
  bandwidth   this machine's memory read bandwidth: the ceiling of batch-1 generation
  training    the tiny preset on CPU (scripts/bench_train.py); unsloth vs hf needs a CUDA GPU
  export      merge, convert, quantize (wall time, peak RSS) for 1B and 3B; our streaming merge vs loading the model
              and PEFT's merge_and_unload
  generation  batch-1 tokens/s, ~100-token prompt, 128 new tokens, greedy: llama-cpp-python on q4_k_m vs
              transformers on the merged model in fp32 and bf16, each against the bandwidth bound
  space       the Space (python space/app.py) as a gradio_client consumer sees it vs raw llama-cpp-python on the
              same GGUF; time to first token over the 6 turns of a conversation
  buffers     llama.cpp's extra buffer types (REPACK, AMX) on vs off on the 1B q4_k_m, with a 128-token prompt:
              what the safe path of common/llama.py costs where it is taken (CPUs with llama.cpp's AMX path)
Every step that loads a model runs in its own process, so the peak RSS reported is that process tree's own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

import bench_train  # noqa: E402  (after the path set-up above)
from common.llama import EXTRA_BUFFERS_ENV, extra_buffers, open_gguf, system_info  # noqa: E402
from common.log import stage_logger  # noqa: E402
from common.machine import cpu_name, usable_cpus  # noqa: E402

DOCS = REPO / "docs"
REPORT, CHART, RESULTS = DOCS / "benchmarks.md", DOCS / "benchmarks.png", DOCS / "benchmarks.json"
README = REPO / "README.md"
README_BEGIN, README_END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
RESULT_PREFIX = "BENCH-RESULT "
SECTIONS = ("bandwidth", "training", "export", "generation", "space", "buffers")

# Llama-3.2-{1B,3B}-Instruct's config.json values that differ from the tiny model's (train/tiny.py), which
# otherwise copies them: vocabulary, rope scaling, tied embeddings, grouped-query attention.
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128),
}
PUBLISHED_PARAMETERS = {"1b": 1_235_814_400, "3b": 3_212_749_824}  # the Hub repos' safetensors totals
LORA_RANK, LORA_TARGETS = 16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARD_BYTES = 5 * 10**9  # the Hub checkpoints' shard limit: 1B is one file, 3B two

TARGETS = dict(space_share=0.97, bandwidth_share_1b=0.85, llama_vs_fp32=9.0, ttft_ratio=1.3,
               export_3b_rss_gb=2.5, export_3b_minutes=4.0)

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


log = stage_logger("bench", stream="stderr", prefix="bench: ").info  # stderr: a worker's stdout carries its result


# ---------------------------------------------------------------------------------------------- models
def shaped_config(size: str) -> dict:
    from train.tiny import TINY_CONFIG

    return {**TINY_CONFIG, **SHAPES[size]}


def tensor_layout(config: dict) -> list[tuple[str, list[int]]]:
    """Names and shapes of the checkpoint's tensors, from a model built on the meta device (no memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    tied = config.get("tie_word_embeddings")
    return [(name, list(tensor.shape)) for name, tensor in model.state_dict().items()
            if not (tied and name == "lm_head.weight")]


def shard(layout: list[tuple[str, list[int]]], value_bytes: int, limit: int = SHARD_BYTES) -> list[list]:
    """Consecutive tensors grouped into files of at most `limit` bytes (one tensor per file if larger).

    >>> [len(s) for s in shard([("a", [4]), ("b", [4]), ("c", [4])], 2, limit=16)]
    [2, 1]
    """
    shards, size = [[]], 0
    for name, shape in layout:
        nbytes = math.prod(shape) * value_bytes
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _write_random(out, name: str, shape: list[int], generator) -> None:
    """One tensor of N(0, 0.02) values (norm weights: ones) in bf16, generated and written in row blocks."""
    import torch

    from export.merge import _write_tensor

    if name.endswith("norm.weight"):
        _write_tensor(out, torch.ones(shape), torch.bfloat16)
        return
    rows_per_block = max(1, (1 << 24) // shape[-1])
    for start in range(0, shape[0], rows_per_block):
        rows = min(rows_per_block, shape[0] - start)
        block = torch.randn((rows, *shape[1:]), generator=generator).mul_(0.02)
        _write_tensor(out, block, torch.bfloat16)


def write_random_model(config: dict, target: Path, seed: int = 0) -> Path:
    """A Hugging Face Llama folder for `config` with random bf16 weights, written tensor by tensor (atomically)."""
    import torch

    from export.merge import INDEX_FILE, _safetensors_header
    from train.tiny import build_tokenizer

    layout = tensor_layout(config)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    shards = shard(layout, 2)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for file_name, tensors in zip(names, shards):
        with (staging / file_name).open("wb") as out:
            out.write(_safetensors_header(tensors, "BF16", 2))
            for name, shape in tensors:
                _write_random(out, name, shape, generator)
    if len(shards) > 1:
        weight_map = {name: file_name for file_name, tensors in zip(names, shards) for name, _ in tensors}
        total = sum(math.prod(shape) for _, shape in layout) * 2
        (staging / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))
    (staging / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **config, "dtype": "bfloat16"}, indent=2))
    (staging / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"], "do_sample": True,
         "temperature": 0.6, "top_p": 0.9}, indent=2))
    build_tokenizer().save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def write_random_adapter(config: dict, base: Path, target: Path, seed: int = 1) -> Path:
    """A random rank-16 LoRA adapter on every projection of every layer (the 1b/3b presets' targets), in PEFT's
    file layout. Both factors are non-zero, so merging really changes every adapted weight."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in tensor_layout(config):
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in LORA_TARGETS:
            out_features, in_features = shape
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(LORA_RANK, in_features, generator=generator) / 50
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, LORA_RANK, generator=generator) / 50
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"})
    (staging / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(base), r=LORA_RANK,
        lora_alpha=LORA_RANK, lora_dropout=0.0, target_modules=list(LORA_TARGETS), bias="none",
        fan_in_fan_out=False, use_rslora=False, init_lora_weights=True), indent=2))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def build_base(size: str, work: Path) -> Path:
    """The Llama-3.2-`size`-shaped model with random weights, built once into `work`."""
    target = work / f"llama-3.2-{size}-shaped-random"
    if (target / "config.json").exists():
        return target
    config = shaped_config(size)
    parameters = sum(math.prod(shape) for _, shape in tensor_layout(config))
    if parameters != PUBLISHED_PARAMETERS[size]:
        raise SystemExit(f"bench: the {size} shape has {parameters:,} parameters, not the published "
                         f"{PUBLISHED_PARAMETERS[size]:,}: fix SHAPES")
    log(f"building a {size}-shaped model with random weights ({parameters / 1e9:.2f}B parameters) in {target}")
    return write_random_model(config, target)


def build_adapter(size: str, base: Path, work: Path) -> Path:
    target = work / f"llama-3.2-{size}-shaped-random-lora"
    if (target / "adapter_config.json").exists():
        return target
    return write_random_adapter(shaped_config(size), base, target)


# ---------------------------------------------------------------------------------------------- one measured step
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
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps({"step": step, **arguments})]
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True)  # stderr: progress, errors
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"bench: step {step} failed (exit {completed.returncode}); its output:\n"
                         f"{completed.stdout[-2000:]}")
    line = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)][-1]
    return {"wall_s": wall, **json.loads(line[len(RESULT_PREFIX):])}


# Steps whose speed is measured run without the memory sampler: on 2 cores even its short wake-ups would delay
# llama.cpp's threads, which wait for one another at every layer. Their peak RSS is the kernel's high-water mark.
UNSAMPLED_STEPS = ("generate", "space", "bandwidth")


def worker(spec: dict) -> None:
    step = spec.pop("step")
    with PeakMemory(sample=step not in UNSAMPLED_STEPS) as memory:
        figures = WORKER_STEPS[step](**spec) or {}
    print(RESULT_PREFIX + json.dumps({"peak_rss": memory.peak_rss, "peak_anon": memory.peak_anon, **figures}),
          flush=True)


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


def _rates(times: list[float], started: float) -> dict:
    return {"ttft_s": times[0] - started, "tokens": len(times),
            "tokens_per_s": (len(times) - 1) / (times[-1] - times[0])}


def step_generate(kind: str, model: str, tokenizer: str, dtype: str | None, prompt_tokens: int,
                  new_tokens: int, threads: int | None = None, extra_buffers: str | None = None) -> dict:
    """One path's batch-1 greedy generation of exactly `new_tokens` tokens after a `prompt_tokens` chat prompt.

    Each path runs in a process of its own: PyTorch's OpenMP threads keep spinning for a while after each
    operation, and on 2 cores they would steal llama.cpp's time if both lived in one process. Tokens/s counts
    the tokens after the first over the time after the first (decoding); TTFT (reading the prompt) is separate.
    A short warm-up run comes first (allocations, kernel selection). extra_buffers: on or off forces llama.cpp's
    extra buffer types (common/llama.py) for this process."""
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
            return _rates(times, started)
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
                                  pad_token_id=128004)
            return _rates(clock.times, started)

    run(4)
    return {"prompt_tokens": len(ids), **loaded, **run(new_tokens)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_space(gguf: str, folder: Path, stream_interval: float) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    server_log = folder / f"space-server-{port}.log"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "space/app.py"), "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
         "--votes", str(folder / "votes.jsonl"), "--stream-interval", str(stream_interval)],
        cwd=REPO, stdout=server_log.open("w"), stderr=subprocess.STDOUT,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return process, url
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                raise SystemExit(f"bench: the Space did not start: {server_log.read_text()[-2000:]}")
            time.sleep(0.5)


def step_space(gguf: str, repeats: int, new_tokens: int, turns: int, turn_tokens: int, folder: str,
               intervals: list[float], pause_s: float = 2.0) -> dict:
    """The Space's server as users start it (one per streaming interval), read by gradio_client, against the
    same GGUF through raw llama-cpp-python with the engine's settings; one at a time, in turn."""
    from gradio_client import Client

    servers = {}
    try:
        for interval in intervals:
            servers[interval] = _start_space(gguf, Path(folder), interval)
        label = Path(gguf).stem
        # Raw llama-cpp-python exactly as space/engine.py sets it up and calls it.
        raw = open_gguf(gguf, n_ctx=4096)

        def raw_run(message: str) -> dict:
            times, started = [], time.perf_counter()
            for chunk in raw.create_chat_completion([{"role": "user", "content": message}], stream=True,
                                                    temperature=0.0, top_p=1.0, max_tokens=new_tokens):
                if chunk["choices"][0]["delta"].get("content"):
                    times.append(time.perf_counter())
            return _rates(times, started)

        def space_run(client, message: str, max_tokens: int) -> dict:
            """Client-side: when the first and last streamed updates arrive; the token count from the Space's
            own stats line (llama-cpp-python streams a piece per token, bar bytes held back for UTF-8)."""
            times, started = [], time.perf_counter()
            job = client.submit(message, label, "", 0.0, 1.0, max_tokens, api_name="/chat")
            last = ""
            for answer, _ in job:
                if answer and answer != last:
                    times.append(time.perf_counter())
                    last = answer
            answer, stats = job.result()
            tokens = int(re.search(r"(\d+) tokens?", stats).group(1))
            server_rate = re.search(r"([\d.]+) tok/s", stats)
            return {"ttft_s": times[0] - started, "tokens": tokens, "updates": len(times),
                    "tokens_per_s": (tokens - 1) / (times[-1] - times[0]),
                    "server_tokens_per_s": float(server_rate.group(1)) if server_rate else None,
                    "server_ttft_s": float(re.search(r"TTFT ([\d.]+) s", stats).group(1))}

        message = TURNS[0].format(t="memory bandwidth")
        raw_run("Hello")  # warm-up, every path
        for _, url in servers.values():
            space_run(Client(url, verbose=False), "Hello", 16)
        throughput = {"raw": [], **{f"space {interval}": [] for interval in intervals}}
        for repeat in range(repeats):
            prompt = f"({TOPICS[repeat % len(TOPICS)]}) {message}"  # a new prompt each time, the same for all
            throughput["raw"].append(raw_run(prompt))
            for interval, (_, url) in servers.items():
                throughput[f"space {interval}"].append(space_run(Client(url, verbose=False), prompt, new_tokens))
            log(f"space {repeat + 1}/{repeats}: " + ", ".join(f"{path} {runs[-1]['tokens_per_s']:.2f} tok/s"
                                                              for path, runs in throughput.items()))
        conversations = []
        _, url = servers[intervals[0]]
        for repeat in range(repeats):
            client, topic = Client(url, verbose=False), TOPICS[(repeat + 3) % len(TOPICS)]
            conversation = []
            for turn in range(turns):
                if turn:
                    # A user reads the answer and types the next message; without a pause the next turn would
                    # also wait for the engine to finish saving the previous one's state (space/engine.py).
                    time.sleep(pause_s)
                conversation.append(space_run(client, TURNS[turn].format(t=topic), turn_tokens))
            conversations.append(conversation)
            log(f"space conversation {repeat + 1}/{repeats}: TTFT by turn "
                + ", ".join(f"{turn['ttft_s']:.2f}" for turn in conversation) + " s")
        return {"new_tokens": new_tokens, "turn_tokens": turn_tokens, "intervals": intervals, "pause_s": pause_s,
                "throughput": throughput, "conversations": conversations}
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=30)


WORKER_STEPS = dict(merge=step_merge, naive_merge=step_naive_merge, convert=step_convert, quantize=step_quantize,
                    bandwidth=step_bandwidth, generate=step_generate, space=step_space)


# ---------------------------------------------------------------------------------------------- sections
class Paths:
    """Where one size's files live under --work."""

    def __init__(self, work: Path, size: str):
        self.size, self.work = size, work
        self.merged = work / f"{size}-merged-16bit"
        self.naive = work / f"{size}-naive-merged"
        self.f16 = work / f"{size}-F16.gguf"
        self.q4 = work / f"{size}-Q4_K_M.gguf"

    def sources(self) -> tuple[Path, Path]:
        base = build_base(self.size, self.work)
        return base, build_adapter(self.size, base, self.work)


def _disk_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export_section(paths: Paths, repeats: int) -> dict:
    base, adapter = paths.sources()
    name = f"Llama-3.2-{paths.size.upper()}-shaped"
    runs = {"merge": [], "convert": [], "quantize": [], "naive_merge": []}
    for repeat in range(repeats):
        # Each repetition starts from nothing: the outputs of the previous one are removed first.
        for leftover in (paths.merged, paths.naive, paths.f16, paths.q4):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        runs["merge"].append(measured("merge", base=str(base), adapter=str(adapter), out=str(paths.merged)))
        runs["convert"].append(measured("convert", merged=str(paths.merged), out=str(paths.f16), name=name))
        runs["quantize"].append(measured("quantize", source=str(paths.f16), out=str(paths.q4)))
        runs["naive_merge"].append(measured("naive_merge", base=str(base), adapter=str(adapter),
                                            out=str(paths.naive)))
        log(f"export {paths.size} {repeat + 1}/{repeats}: " + ", ".join(
            f"{step} {r[-1]['wall_s']:.0f} s / {r[-1]['peak_rss'] / 1e9:.2f} GB" for step, r in runs.items()))
    sizes = {"base": _disk_bytes(base), "merged": _disk_bytes(paths.merged), "f16": _disk_bytes(paths.f16),
             "q4_k_m": _disk_bytes(paths.q4)}
    shutil.rmtree(paths.naive, ignore_errors=True)  # identical in content to merged; 2.5-6.4 GB of disk
    paths.f16.unlink(missing_ok=True)
    return {"runs": runs, "bytes": sizes}


def ensure_exported(paths: Paths) -> None:
    """The q4_k_m GGUF and merged folder the other sections read, made (unmeasured) if the export section did not."""
    if paths.q4.is_file() and (paths.merged / "config.json").is_file():
        return
    base, adapter = paths.sources()
    log(f"exporting the {paths.size}-shaped model for the generation benchmarks (not measured)")
    measured("merge", base=str(base), adapter=str(adapter), out=str(paths.merged))
    measured("convert", merged=str(paths.merged), out=str(paths.f16), name=f"Llama-3.2-{paths.size.upper()}-shaped")
    measured("quantize", source=str(paths.f16), out=str(paths.q4))
    paths.f16.unlink(missing_ok=True)


def run_sections(args, results: dict) -> None:
    sizes = [Paths(args.work, size) for size in args.sizes]
    sections = results.setdefault("sections", {})

    def save(name: str, figures: dict) -> None:
        sections[name] = {"measured": time.strftime("%Y-%m-%d %H:%M"), **figures}
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")

    if "bandwidth" in args.sections:
        log("bandwidth")
        save("bandwidth", measured("bandwidth", repeats=max(5, args.repeats)))
    if "training" in args.sections:
        log("training (tiny preset, real CLI)")
        save("training", bench_train.measure(args.repeats, 10))
    if "export" in args.sections:
        save("export", {paths.size: export_section(paths, args.export_repeats) for paths in sizes})
    if "generation" in args.sections or "space" in args.sections:
        for paths in sizes:
            ensure_exported(paths)
    if "generation" in args.sections:
        one_b = Paths(args.work, "1b")
        ensure_exported(one_b)
        paths = {f"llama.cpp q4_k_m {p.size}": ("llama.cpp", str(p.q4), None, p.size, None) for p in sizes}
        if usable_cpus() > 1:  # does llama.cpp's speed follow the cores (compute-bound) or not (memory-bound)?
            paths["llama.cpp q4_k_m 1b, 1 thread"] = ("llama.cpp", str(one_b.q4), None, "1b", 1)
        paths.update({f"transformers {dtype} 1b": ("transformers", str(one_b.merged), dtype, "1b", None)
                      for dtype in ("float32", "bfloat16")})
        runs = {name: [] for name in paths}
        for repeat in range(args.repeats):  # every path once per repetition: noise from neighbours hits all alike
            for name, (kind, model, dtype, _, threads) in paths.items():
                runs[name].append(measured("generate", kind=kind, model=model, tokenizer=str(one_b.merged),
                                           dtype=dtype, prompt_tokens=100, new_tokens=128, threads=threads))
                log(f"generation {repeat + 1}/{args.repeats} {name}: {runs[name][-1]['tokens_per_s']:.2f} tok/s, "
                    f"TTFT {runs[name][-1]['ttft_s']:.2f} s")
        first = next(iter(runs.values()))[0]
        save("generation", {"prompt_tokens": first["prompt_tokens"], "new_tokens": 128, "runs": runs,
                            "gguf_bytes": {p.size: p.q4.stat().st_size for p in sizes},
                            "merged_parameters": PUBLISHED_PARAMETERS,
                            "paths": {name: {"kind": kind, "size": size, "dtype": dtype, "threads": threads or usable_cpus()}
                                      for name, (kind, _, dtype, size, threads) in paths.items()}})
    if "space" in args.sections:
        from space.app import STREAM_INTERVAL

        one_b = Paths(args.work, "1b")
        save("space", measured("space", gguf=str(one_b.q4), repeats=args.repeats, new_tokens=128, turns=6,
                               turn_tokens=64, folder=str(args.work), intervals=[STREAM_INTERVAL, 0.0]))  # default, per token
    if "buffers" in args.sections:
        one_b = Paths(args.work, "1b")
        ensure_exported(one_b)
        runs = {"on": [], "off": []}
        for repeat in range(args.repeats):  # both settings once per repetition
            for setting in runs:
                runs[setting].append(measured("generate", kind="llama.cpp", model=str(one_b.q4),
                                              tokenizer=str(one_b.merged), dtype=None, prompt_tokens=128,
                                              new_tokens=128, extra_buffers=setting))
                log(f"buffers {repeat + 1}/{args.repeats} {setting}: {runs[setting][-1]['tokens_per_s']:.2f} tok/s, "
                    f"TTFT {runs[setting][-1]['ttft_s']:.2f} s")
        save("buffers", {"prompt_tokens": runs["on"][0]["prompt_tokens"], "new_tokens": 128, "runs": runs,
                         "cpu": cpu_name(), "system_info": system_info(),
                         "auto": extra_buffers().describe()})


# ---------------------------------------------------------------------------------------------- report
def median(values) -> float:
    return statistics.median(values)


def summary(results: dict) -> dict:
    """The headline figures (medians and ratios) from the raw results; absent sections give absent keys."""
    sections, out = results.get("sections", {}), {}
    bandwidth = sections.get("bandwidth")
    if bandwidth:
        out["bandwidth"] = max(value for key, value in bandwidth.items() if key.startswith("threads_"))
    generation = sections.get("generation")
    if generation:
        out["generation"] = {}
        for name, runs in generation["runs"].items():
            path = generation["paths"][name]
            size, dtype = path["size"], path["dtype"]
            if dtype is None:
                weight_bytes = generation["gguf_bytes"][size]
            else:
                weight_bytes = generation["merged_parameters"][size] * (4 if dtype == "float32" else 2)
            entry = {"tokens_per_s": median(r["tokens_per_s"] for r in runs),
                     "ttft_s": median(r["ttft_s"] for r in runs), "weight_bytes": weight_bytes}
            if "bandwidth" in out:  # the read rate of as many threads as the path uses
                read_rate = bandwidth.get(f"threads_{path['threads']}", out["bandwidth"])
                entry["bound"] = read_rate / weight_bytes
                entry["share"] = entry["tokens_per_s"] / entry["bound"]
            out["generation"][name] = entry
        fp32 = out["generation"].get("transformers float32 1b")
        llama = out["generation"].get("llama.cpp q4_k_m 1b")
        if fp32 and llama:
            out["llama_vs_fp32"] = llama["tokens_per_s"] / fp32["tokens_per_s"]
        bf16 = out["generation"].get("transformers bfloat16 1b")
        if bf16 and llama:
            out["llama_vs_bf16"] = llama["tokens_per_s"] / bf16["tokens_per_s"]
    space = sections.get("space")
    if space:
        paths = {}
        for path, runs in space["throughput"].items():
            paths[path] = {"tokens_per_s": median(r["tokens_per_s"] for r in runs),
                           "ttft_s": median(r["ttft_s"] for r in runs)}
            if path != "raw":
                paths[path]["server_tokens_per_s"] = median(r["server_tokens_per_s"] for r in runs)
                paths[path]["updates"] = median(r["updates"] for r in runs)
        default = paths[f"space {space['intervals'][0]}"]
        turns = len(space["conversations"][0])
        ttft = [median(c[turn]["ttft_s"] for c in space["conversations"]) for turn in range(turns)]
        out["space"] = {"paths": paths, "raw": paths["raw"]["tokens_per_s"], "client": default["tokens_per_s"],
                        "share": default["tokens_per_s"] / paths["raw"]["tokens_per_s"], "ttft": ttft,
                        "ttft_ratio": ttft[-1] / ttft[0]}
    export = sections.get("export")
    if export:
        out["export"] = {}
        for size, figures in export.items():
            if size == "measured":
                continue
            steps = {step: {"wall_s": median(r["wall_s"] for r in runs), "peak_rss": median(r["peak_rss"] for r in runs),
                            "peak_anon": median(r["peak_anon"] for r in runs)} for step, runs in figures["runs"].items()}
            ours = ("merge", "convert", "quantize")
            naive = ("naive_merge", "convert", "quantize")
            out["export"][size] = {
                "steps": steps, "bytes": figures["bytes"],
                "ours_wall_s": sum(steps[s]["wall_s"] for s in ours),
                "ours_peak_rss": max(steps[s]["peak_rss"] for s in ours),
                "naive_wall_s": sum(steps[s]["wall_s"] for s in naive),
                "naive_peak_rss": max(steps[s]["peak_rss"] for s in naive)}
    training = sections.get("training")
    if training:
        out["training"] = training["median_tokens_per_second"]
    buffers = sections.get("buffers")
    if buffers:
        paths = {setting: {"tokens_per_s": median(r["tokens_per_s"] for r in runs),
                           "ttft_s": median(r["ttft_s"] for r in runs)} for setting, runs in buffers["runs"].items()}
        out["buffers"] = {**paths, "decode_off_vs_on": paths["off"]["tokens_per_s"] / paths["on"]["tokens_per_s"],
                          "prefill_off_vs_on": paths["on"]["ttft_s"] / paths["off"]["ttft_s"]}
    return out


def gb(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


def target_rows(s: dict) -> list[tuple[str, str, str, str]]:
    """(target, measured, met?, note) for each of the issue's targets that was measured."""
    rows = []

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    if "space" in s:
        share = s["space"]["share"]
        rows.append(("Space ≥ 97% of raw llama-cpp-python tokens/s (1B)",
                     f"{share:.1%} ({s['space']['client']:.1f} vs {s['space']['raw']:.1f} tok/s)",
                     verdict(share >= TARGETS["space_share"]), ""))
    llama = s.get("generation", {}).get("llama.cpp q4_k_m 1b", {})
    if "share" in llama:
        rows.append(("raw ≥ 85% of the memory-bandwidth bound (1B q4_k_m)",
                     f"{llama['share']:.0%} ({llama['tokens_per_s']:.1f} of {llama['bound']:.1f} tok/s)",
                     verdict(llama["share"] >= TARGETS["bandwidth_share_1b"]), ""))
    if "llama_vs_fp32" in s:
        rows.append(("q4_k_m through llama.cpp ≥ 9× transformers fp32 (1B)", f"{s['llama_vs_fp32']:.1f}×",
                     verdict(s["llama_vs_fp32"] >= TARGETS["llama_vs_fp32"]), ""))
    if "space" in s:
        ttft = s["space"]["ttft"]
        rows.append(("turn-6 TTFT ≤ 1.3× turn-1 (1B, through the Space)",
                     f"{s['space']['ttft_ratio']:.2f}× ({ttft[0]:.2f} s → {ttft[-1]:.2f} s)",
                     verdict(s["space"]["ttft_ratio"] <= TARGETS["ttft_ratio"]), ""))
    three = s.get("export", {}).get("3b")
    if three:
        rows.append(("3B export ≤ 2.5 GB peak RSS", gb(three["ours_peak_rss"]),
                     verdict(three["ours_peak_rss"] <= TARGETS["export_3b_rss_gb"] * 1e9), ""))
        rows.append(("3B export ≤ 4 minutes", f"{three['ours_wall_s'] / 60:.1f} min",
                     verdict(three["ours_wall_s"] <= TARGETS["export_3b_minutes"] * 60), ""))
    return rows


def machine() -> dict:
    import platform

    import llama_cpp
    import torch
    import transformers

    return {"cpu": cpu_name(), "cores": usable_cpus(), "ram_gb": os.sysconf("SC_PHYS_PAGES") *
            os.sysconf("SC_PAGE_SIZE") / 2**30, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "llama_cpp_python": llama_cpp.__version__}


def targets_table(s: dict) -> str:
    rows = target_rows(s)
    lines = ["| target | measured | |", "|---|---|---|"]
    lines += [f"| {target} | {value} | {ok} |" for target, value, ok, _ in rows]
    return "\n".join(lines)


def render_chart(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0][0]
    if "generation" in s:
        names = list(s["generation"])
        rates = [s["generation"][n]["tokens_per_s"] for n in names]
        bars = ax.bar(range(len(names)), rates, color=["tab:green" if n.startswith("llama") else "tab:gray"
                                                        for n in names])
        for i, n in enumerate(names):
            if "bound" in s["generation"][n]:
                ax.hlines(s["generation"][n]["bound"], i - 0.4, i + 0.4, colors="tab:red", linestyles="dashed")
        ax.bar_label(bars, fmt="%.1f")
        ax.set_xticks(range(len(names)), [n.replace(" ", "\n", 1) for n in names], fontsize=8)
        ax.set_ylabel("tokens/s (batch 1, greedy)")
        ax.set_title("CPU generation (red: memory-bandwidth bound)")
    ax = axes[0][1]
    if "space" in s:
        names = list(s["space"]["paths"])
        values = [s["space"]["paths"][n]["tokens_per_s"] for n in names]
        labels = ["raw\nllama-cpp-python" if n == "raw" else f"Space, update\nevery {float(n.split()[1]):g} s"
                  if float(n.split()[1]) else "Space, update\nper token" for n in names]
        bars = ax.bar(labels, values, color=["tab:green"] + ["tab:blue"] * (len(names) - 1))
        ax.bar_label(bars, fmt="%.1f")
        ax.set_ylabel("tokens/s")
        ax.set_title("1B q4_k_m: the Space's overhead")
    ax = axes[1][0]
    if "space" in s:
        ttft = s["space"]["ttft"]
        ax.plot(range(1, len(ttft) + 1), ttft, marker="o")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("turn of the conversation")
        ax.set_ylabel("time to first token (s)")
        ax.set_title("1B through the Space: TTFT by turn")
    ax = axes[1][1]
    if "export" in s:
        sizes = list(s["export"])
        width = 0.35
        ours = [s["export"][z]["ours_peak_rss"] / 1e9 for z in sizes]
        naive = [s["export"][z]["naive_peak_rss"] / 1e9 for z in sizes]
        b1 = ax.bar([i - width / 2 for i in range(len(sizes))], ours, width, label="streaming merge (ours)")
        b2 = ax.bar([i + width / 2 for i in range(len(sizes))], naive, width, label="merge_and_unload")
        ax.bar_label(b1, fmt="%.2f")
        ax.bar_label(b2, fmt="%.2f")
        ax.set_xticks(range(len(sizes)), [z.upper() for z in sizes])
        ax.set_ylabel("peak RSS of merge → convert → quantize (GB)")
        ax.set_title("Export memory")
        ax.legend()
    fig.suptitle("Measured on " + s.get("machine_line", "this machine"), fontsize=10)
    fig.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(temporary, dpi=110)
    plt.close(fig)
    os.replace(temporary, path)


def _runs(values, fmt: str = "{:.1f}") -> str:
    return ", ".join(fmt.format(v) for v in values)


def render_report(results: dict, s: dict) -> str:
    sections = results.get("sections", {})
    lines = [
        "# Benchmarks",
        "",
        f"Measured on {s['machine_line']}, by `python scripts/bench.py` (each section says when). Every figure is the "
        "median of the repetitions shown; every raw figure is in [benchmarks.json](benchmarks.json); the chart is "
        "[benchmarks.png](benchmarks.png). The 1B and 3B models are Llama-3.2-shaped with random weights "
        "(see `scripts/bench.py`): same sizes, same cost per token, meaningless words. This machine is shared, so "
        "the paths being compared run in turn within each repetition rather than one after the other.",
        "",
        "![benchmarks](benchmarks.png)",
        "",
        "## Targets",
        "",
        targets_table(s),
        "",
    ]
    lines += misses(s)
    if "bandwidth" in sections:
        bw = sections["bandwidth"]
        lines += ["## Memory bandwidth", "", f"Measured {bw['measured']}: numpy reductions over a 2 GiB buffer, "
                  + ", ".join(f"{key.split('_')[1]} thread(s): {value / 1e9:.1f} GB/s" for key, value in bw.items()
                              if key.startswith("threads_"))
                  + f". The bound for batch-1 generation is this read rate ({s['bandwidth'] / 1e9:.1f} GB/s) "
                  "divided by the bytes of weights read per token (the GGUF's size; the fp32/bf16 weights' size "
                  "for transformers).", ""]
    if "generation" in sections:
        g = sections["generation"]
        lines += ["## CPU generation, batch 1", "",
                  f"Measured {g['measured']}: a {g['prompt_tokens']}-token chat prompt, {g['new_tokens']} new tokens, "
                  f"greedy, {usable_cpus()} threads; tokens/s counts decoding only (after the first token), TTFT is the "
                  "prompt's time to first token. transformers runs the merged 1B model loaded in each dtype "
                  "(what earlier Spaces in this field serve with `model.generate`).", "",
                  "| path | weights read per token | median tokens/s | runs | TTFT | bound | share of bound |",
                  "|---|---|---|---|---|---|---|"]
        for name, entry in s["generation"].items():
            runs = g["runs"][name]
            lines.append(f"| {name} | {gb(entry['weight_bytes'])} | **{entry['tokens_per_s']:.2f}** | "
                         f"{_runs([r['tokens_per_s'] for r in runs], '{:.2f}')} | {entry['ttft_s']:.2f} s | "
                         f"{entry.get('bound', float('nan')):.1f} | {entry.get('share', float('nan')):.0%} |")
        if "llama_vs_fp32" in s:
            lines += ["", f"llama.cpp q4_k_m is **{s['llama_vs_fp32']:.1f}×** transformers fp32 and "
                      f"**{s.get('llama_vs_bf16', float('nan')):.1f}×** transformers bf16 on the 1B model."]
        lines.append("")
    if "space" in sections:
        sp, ss = sections["space"], s["space"]
        lines += ["## Through the Space", "",
                  f"Measured {sp['measured']}: `python space/app.py --model 1b-Q4_K_M.gguf` as users start it, read "
                  "by a gradio_client consumer (tokens/s from when its streamed updates arrive), against raw "
                  "llama-cpp-python on the same GGUF with the engine's settings, alternating, greedy, "
                  f"{sp['new_tokens']} new tokens.", "",
                  "| path | median tokens/s seen | share of raw | the engine's own figure | updates sent | "
                  "runs (tokens/s) | TTFT |", "|---|---|---|---|---|---|---|"]
        for path, entry in ss["paths"].items():
            runs = _runs([r["tokens_per_s"] for r in sp["throughput"][path]], "{:.2f}")
            if path == "raw":
                lines.append(f"| raw llama-cpp-python | {entry['tokens_per_s']:.2f} | 100% | | | {runs} | "
                             f"{entry['ttft_s']:.2f} s |")
                continue
            interval = float(path.split()[1])
            name = (f"the Space, an update every {interval:g} s (default)" if interval == sp["intervals"][0]
                    else "the Space, an update per token" if interval == 0 else f"the Space, every {interval:g} s")
            lines.append(f"| {name} via gradio_client | **{entry['tokens_per_s']:.2f}** | "
                         f"{entry['tokens_per_s'] / ss['raw']:.1%} | {entry['server_tokens_per_s']:.2f} | "
                         f"{entry['updates']:.0f} | {runs} | {entry['ttft_s']:.2f} s |")
        lines += ["",
                  f"Time to first token over one conversation ({len(ss['ttft'])} turns of ≈40-token messages, "
                  f"{sp['turn_tokens']}-token answers, {sp.get('pause_s', 0):g} s between an answer and the next "
                  "message, a new conversation per repetition), seen by the client:", "",
                  "| turn | " + " | ".join(str(i + 1) for i in range(len(ss["ttft"]))) + " |",
                  "|---|" + "---|" * len(ss["ttft"]),
                  "| median TTFT (s) | " + " | ".join(f"{t:.2f}" for t in ss["ttft"]) + " |",
                  "| runs (s) | " + " | ".join(_runs([c[i]["ttft_s"] for c in sp["conversations"]], "{:.2f}")
                                               for i in range(len(ss["ttft"]))) + " |", ""]
    if "export" in sections:
        ex = sections["export"]
        lines += ["## Export", "",
                  f"Measured {ex['measured']}: each step in its own process (wall time includes starting Python and "
                  "importing torch; peak RSS sums the process and its children, sampled every 20 ms and checked "
                  "against the kernel's high-water mark; *anonymous* leaves out file pages mapped from disk, which "
                  "the kernel can drop instead of killing the process). Streaming merge is `export/merge.py`; the "
                  "naive merge loads the base in fp16, applies PEFT's `merge_and_unload` and `save_pretrained`. "
                  "Convert (llama.cpp's `convert_hf_to_gguf.py`, F16) and quantize (q4_k_m) are the same for both "
                  "paths.", ""]
        for size, figures in ex.items():
            if size == "measured":
                continue
            e = s["export"][size]
            lines += [f"**{size.upper()}** (base {gb(e['bytes']['base'])} bf16 → merged {gb(e['bytes']['merged'])} "
                      f"fp16 → F16 GGUF {gb(e['bytes']['f16'])} → q4_k_m {gb(e['bytes']['q4_k_m'])}):", "",
                      "| step | median wall | runs | peak RSS | peak anonymous |", "|---|---|---|---|---|"]
            for step, st in e["steps"].items():
                runs = figures["runs"][step]
                lines.append(f"| {step.replace('_', ' ')} | {st['wall_s']:.0f} s | "
                             f"{_runs([r['wall_s'] for r in runs], '{:.0f}')} | {gb(st['peak_rss'])} | "
                             f"{gb(st['peak_anon'])} |")
            lines += [f"| **ours: merge → convert → quantize** | **{e['ours_wall_s'] / 60:.1f} min** | | "
                      f"**{gb(e['ours_peak_rss'])}** | |",
                      f"| naive: merge_and_unload → convert → quantize | {e['naive_wall_s'] / 60:.1f} min | | "
                      f"{gb(e['naive_peak_rss'])} | |", ""]
    if "training" in sections:
        t = sections["training"]
        lines += [bench_train.render(t, t["measured"], f"python scripts/bench.py --sections training --repeats "
                                                       f"{t['repeats']}"), ""]
    if "buffers" in sections:
        b, sb = sections["buffers"], s["buffers"]
        lines += ["## llama.cpp's extra buffer types: the cost of the AMX safe path", "",
                  f"Measured {b['measured']} on {b['cpu']} (`python scripts/bench.py --sections buffers --repeats "
                  f"{len(b['runs']['on'])}`): the 1B-shaped q4_k_m through `common/llama.py` with "
                  f"`FINETOME_LLAMA_EXTRA_BUFFERS=on` and `=off`, in turn within each repetition; a "
                  f"{b['prompt_tokens']}-token chat prompt (TTFT: reading it), then {b['new_tokens']} greedy tokens "
                  f"(tokens/s: decoding). llama.cpp's system info here: `{b['system_info']}`; the automatic "
                  f"choice: {b['auto']}.", "",
                  "| extra buffer types | median tokens/s | runs | median TTFT | runs |", "|---|---|---|---|---|"]
        for setting in ("on", "off"):
            runs = b["runs"][setting]
            lines.append(f"| {setting} | **{sb[setting]['tokens_per_s']:.2f}** | "
                         f"{_runs([r['tokens_per_s'] for r in runs], '{:.2f}')} | {sb[setting]['ttft_s']:.2f} s | "
                         f"{_runs([r['ttft_s'] for r in runs], '{:.2f}')} |")
        lines += ["", f"Off vs on: decoding at **{sb['decode_off_vs_on']:.2f}×** the speed, reading the prompt at "
                  f"**{sb['prefill_off_vs_on']:.2f}×**. The safe path is taken only where llama.cpp reports its AMX "
                  "path (`AMX_INT8 = 1`), whose kernels crash on q4_k_m and q8_0 (llama.cpp issue 20824): there the "
                  "comparison is with a crash, and REPACK is lost with AMX since llama.cpp switches them together. "
                  "Everywhere else llama.cpp's default (on) is kept; `FINETOME_LLAMA_EXTRA_BUFFERS=off` is the switch "
                  "for a machine where off measures faster.", ""]
    return "\n".join(lines).rstrip() + "\n"


def misses(s: dict) -> list[str]:
    """For each missed target: by how much, why (from the figures of the same run), and what would close it."""
    notes = []
    space = s.get("space")
    if space and space["share"] < TARGETS["space_share"]:
        per_token = next((entry for path, entry in space["paths"].items() if path != "raw"
                          and float(path.split()[1]) == 0), None)
        notes.append(
            f"- **Space vs raw**: {space['share']:.1%}, {TARGETS['space_share'] - space['share']:.1%} short"
            + (f" (one update per token: {per_token['tokens_per_s'] / space['raw']:.1%})" if per_token else "")
            + ". The repetitions scatter by ±10% on this shared machine (see the runs), more than the gap, but "
            "the Space does spend CPU that raw llama-cpp-python does not: Gradio diffs, serialises and sends each "
            "update, and here the gradio_client consumer runs on the same two cores as the model (a Space user's "
            "browser does not). With both cores generating, each such moment delays one of llama.cpp's two threads "
            "and the other waits for it at the next layer. Throttling updates to 10 a second did not measurably "
            "change it. What would close it: serving with one llama.cpp thread fewer than there are cores once a "
            "Space has more than two, so that the web server has a core of its own (on 2 vCPUs that would cost "
            "more than it saves: one thread gives 74% of two's tokens/s, below).")
    generation = s.get("generation", {})
    llama, single = generation.get("llama.cpp q4_k_m 1b"), generation.get("llama.cpp q4_k_m 1b, 1 thread")
    if llama and "share" in llama and llama["share"] < TARGETS["bandwidth_share_1b"]:
        text = (f"- **Bandwidth bound**: {llama['share']:.0%} of the bound, {TARGETS['bandwidth_share_1b'] - llama['share']:.0%} "
                f"short ({llama['tokens_per_s']:.1f} of {llama['bound']:.1f} tokens/s).")
        if single:
            text += (f" One thread alone makes {single['tokens_per_s']:.1f} tokens/s ({single['share']:.0%} of what one "
                     f"thread can read); the second core adds only {llama['tokens_per_s'] / single['tokens_per_s'] - 1:.0%}, "
                     "so neither memory (one thread already reads almost as fast as two) nor arithmetic alone sets the "
                     "pace: on two cores the per-token fixed costs (synchronising the threads at every layer, the "
                     "128,256-wide output row, sampling and Python per token) take a share that more cores would "
                     "spread. What would close it: more cores (not measurable here), or batching several "
                     "conversations per step (llama.cpp's server), which reads the weights once for all of them.")
        notes.append(text)
    if "llama_vs_fp32" in s and s["llama_vs_fp32"] < TARGETS["llama_vs_fp32"]:
        fp32 = generation["transformers float32 1b"]
        notes.append(
            f"- **llama.cpp vs transformers fp32**: {s['llama_vs_fp32']:.1f}×, short of 9×. fp32 reads "
            f"{fp32['weight_bytes'] / llama['weight_bytes']:.1f}× the bytes per token, so 9× needs llama.cpp to be "
            "closer to its own bound than transformers is to its own "
            f"({llama.get('share', float('nan')):.0%} vs {fp32.get('share', float('nan')):.0%} here); "
            "what closes it is what closes the bandwidth gap above.")
    if space and space["ttft_ratio"] > TARGETS["ttft_ratio"]:
        ttft = space["ttft"]
        notes.append(
            f"- **Turn-6 TTFT**: {space['ttft_ratio']:.2f}× turn 1 ({ttft[0]:.2f} → {ttft[-1]:.2f} s), "
            f"{space['ttft_ratio'] - TARGETS['ttft_ratio']:.2f}× over; later turns scatter between ≈0.45 and ≈1.5 s. "
            "The time is the engine's own (its stats line accounts for all but ≈0.07 s of it) and follows the number "
            "of prompt tokens a turn must read. Turn 1 reads only the message after the system header it shares "
            "with the previous conversation (≈25-40 tokens). A later turn reads the new message plus whatever of "
            "the previous answer cannot be matched to the tokens in the cache. The engine matches by the text the "
            "cached tokens spell (space/engine.py's reusable_prefix), not by re-tokenising: a direct check "
            "(1B-shaped, greedy, 64-token answers) read 49 tokens at turn 2 (0.38 s) where token matching read "
            "107 (0.84 s). What still misses here is random weights sampling half a UTF-8 character: "
            "llama-cpp-python's streamed text drops such bytes, so the answer Gradio sends back no longer spells "
            "the cached tokens and is re-read from there (in that check's second conversation turn 2 still read "
            "108 tokens, 0.78 s); a trained model does not emit broken characters. What would close it for any "
            "model: keep each answer's sampled token ids with the conversation (Gradio session state) instead of "
            "recovering them from its text.")
    export = s.get("export", {}).get("3b")
    if export and export["ours_peak_rss"] > TARGETS["export_3b_rss_gb"] * 1e9:
        worst = max(("merge", "convert", "quantize"), key=lambda step: export["steps"][step]["peak_rss"])
        notes.append(f"- **3B export memory**: {gb(export['ours_peak_rss'])}, over by "
                     f"{gb(export['ours_peak_rss'] - TARGETS['export_3b_rss_gb'] * 1e9)}; the peak is {worst}'s.")
    if export and export["ours_wall_s"] > TARGETS["export_3b_minutes"] * 60:
        notes.append(f"- **3B export time**: {export['ours_wall_s'] / 60:.1f} min, over by "
                     f"{export['ours_wall_s'] / 60 - TARGETS['export_3b_minutes']:.1f} min.")
    return ["### Where a target is missed", "", *notes, ""] if notes else []


def readme_block(results: dict, s: dict) -> str:
    return "\n".join([
        README_BEGIN,
        f"Measured on {s['machine_line']} by `python scripts/bench.py` "
        "(details, raw figures and the chart in [docs/benchmarks.md](docs/benchmarks.md)):",
        "",
        targets_table(s),
        README_END,
    ])


def write_outputs(results: dict) -> None:
    from bench_train import replace_section

    s = summary(results)
    m = results["machine"]
    s["machine_line"] = (f"{m['cpu']}, {m['cores']} usable cores, {m['ram_gb']:.0f} GiB RAM, no GPU "
                         f"(torch {m['torch']}, transformers {m['transformers']}, llama-cpp-python "
                         f"{m['llama_cpp_python']}), {results['date']}")
    DOCS.mkdir(exist_ok=True)
    render_chart(s, CHART)
    temporary = REPORT.with_name(f".{REPORT.name}.tmp")
    temporary.write_text(render_report(results, s))
    os.replace(temporary, REPORT)
    readme = README.read_text()
    if README_BEGIN in readme:
        README.write_text(replace_section(readme, readme_block(results, s), README_BEGIN, README_END))
    log(f"wrote {REPORT.relative_to(REPO)}, {CHART.relative_to(REPO)}, {RESULTS.relative_to(REPO)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, from: {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--sizes", default="1b,3b", help="model shapes for export and generation: 1b, 3b")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of each speed measurement")
    parser.add_argument("--export-repeats", type=int, default=2, help="repetitions of each export step")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder for the shaped models and GGUFs (default: $FINETOME_CACHE/bench)")
    parser.add_argument("--render-only", action="store_true", help="rewrite the report from docs/benchmarks.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    problems = [f"--sections: unknown {s!r}; choose from {', '.join(SECTIONS)}" for s in args.sections
                if s not in SECTIONS]
    problems += [f"--sizes: unknown {s!r}; choose from {', '.join(SHAPES)}" for s in args.sizes if s not in SHAPES]
    problems += [f"--{name.replace('_', '-')} {value}: must be at least 1" for name, value in
                 (("repeats", args.repeats), ("export_repeats", args.export_repeats)) if value < 1]
    if problems:
        print("\n".join(f"bench: {p}" for p in problems), file=sys.stderr)
        return 2
    if args.work is None:
        from common.llama3 import cache_root

        args.work = cache_root() / "bench"
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.render_only:
        results["command"] = "python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
        results["command"] = results["command"].strip()
        results["date"] = time.strftime("%Y-%m-%d")
        results["machine"] = machine()
        started = time.perf_counter()
        run_sections(args, results)
        log(f"measured in {(time.perf_counter() - started) / 60:.1f} min")
    if not results.get("sections"):
        print("bench: nothing measured yet; run without --render-only first", file=sys.stderr)
        return 2
    write_outputs(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
