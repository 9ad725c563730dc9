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
  startup     training start-up on a 100,000-row, 249 MB FineTome-shaped file: time to the first optimizer step
              and peak RSS, fresh and after a SIGKILL (resume)
  export      merge, convert, quantize (wall time, peak RSS) for 1B and 3B; our streaming merge vs loading the model
              and PEFT's merge_and_unload
  generation  batch-1 tokens/s, ~100-token prompt, 128 new tokens, greedy: llama-cpp-python on q4_k_m vs
              transformers on the merged model in fp32 and bf16, each against the bandwidth bound
  space       the Space (python space/app.py) as a gradio_client consumer sees it vs raw llama-cpp-python on the
              same GGUF; time to first token over the 6 turns of a conversation
  buffers     llama.cpp's extra buffer types (REPACK, AMX) on vs off on the 1B q4_k_m, with a 128-token prompt:
              what the safe path of common/llama_runtime.py costs where it is taken (CPUs with llama.cpp's AMX path)
  concurrency 1, 2, 4 and 8 users at once on the 1B q4_k_m, 128 new tokens each: the Space's in-process engine vs
              llama.cpp's llama-server with a slot per user (built once from the pinned llama.cpp: ~7 min on 2
              cores); tokens/s in all and per user, TTFT p50/p95
  waves       the Space's RSS over a warm-up and 3 waves of 100 conversations (20 at a time, 64 new tokens) on two
              1B q4_k_m entries, with a state-cache bound the warm-up fills: memory must stay flat (<= 5% growth)
Every step that loads a model runs in its own process, so the peak RSS reported is that process tree's own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench import log
from bench.harness import worker
from bench.report import RESULTS, write_outputs
from bench.sections import SECTIONS, run_sections
from bench.shapes import SHAPES
from common.cli import UsageError, UsageParser
from common.llama3 import cache_root
from common.machine import cpu_name, usable_cpus


def machine() -> dict:
    """Where a run measures: the CPU, its usable cores, RAM and the versions that set the speeds."""
    import platform

    import llama_cpp
    import torch
    import transformers

    return {"cpu": cpu_name(), "cores": usable_cpus(), "ram_gb": os.sysconf("SC_PHYS_PAGES") *
            os.sysconf("SC_PAGE_SIZE") / 2**30, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "llama_cpp_python": llama_cpp.__version__}


def main(argv: list[str] | None = None) -> int:
    """scripts/bench.py: check the flags (every problem at once, exit 2), measure the sections asked for, or with
    --render-only none, then rewrite the report; --worker runs one measured step (bench.harness)."""
    parser = UsageParser(prog="python scripts/bench.py", description=__doc__.splitlines()[0],
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
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        return error.report()
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
        return UsageError(problems).report()
    if args.work is None:
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
        print("error: --render-only: nothing measured yet; run without --render-only first", file=sys.stderr)
        return 2
    write_outputs(results)
    return 0
