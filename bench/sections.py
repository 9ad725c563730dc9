"""The sections of a run (bench/cli.py describes each), measured in this order; each one's figures are saved into
docs/benchmarks.json under its name as soon as it is done, stamped with when it was measured, and the sections a
run leaves out keep their last figures.

    run_sections(args, results)   # args: --sections, --sizes, --repeats, --export-repeats, --work
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from bench import concurrency, log, soak, startup, training, waves
from bench.harness import measured
from bench.report import RESULTS
from bench.shapes import PUBLISHED_PARAMETERS, build_adapter, build_base
from common.files import write_text_atomic
from common.llama_runtime import extra_buffers, system_info
from common.machine import cpu_name, usable_cpus

SECTIONS = ("bandwidth", "training", "startup", "export", "generation", "space", "buffers", "concurrency",
            "waves", "soak")


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
        write_text_atomic(RESULTS, json.dumps(results, indent=1) + "\n")

    if "bandwidth" in args.sections:
        log("bandwidth")
        save("bandwidth", measured("bandwidth", repeats=max(5, args.repeats)))
    if "training" in args.sections:
        log("training (tiny preset, real CLI)")
        save("training", training.measure(args.repeats, 10))
    if "startup" in args.sections:
        save("startup", {"cpu": cpu_name(), "cores": usable_cpus(), **startup.measure(args.work, args.repeats)})
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
                            "paths": {name: {"kind": kind, "size": size, "dtype": dtype,
                                             "threads": threads or usable_cpus()}
                                      for name, (kind, _, dtype, size, threads) in paths.items()}})
    if "space" in args.sections:
        from space.app import STREAM_INTERVAL

        one_b = Paths(args.work, "1b")
        save("space", measured("space", gguf=str(one_b.q4), repeats=args.repeats, new_tokens=128, turns=6,
                               turn_tokens=64, folder=str(args.work),
                               intervals=[STREAM_INTERVAL, 0.0]))  # the default, an update per token
    if "concurrency" in args.sections:
        one_b = Paths(args.work, "1b")
        ensure_exported(one_b)
        save("concurrency", concurrency.measure(one_b.q4, users=(1, 2, 4, 8), new_tokens=128, repeats=args.repeats))
    if "waves" in args.sections:
        one_b = Paths(args.work, "1b")
        ensure_exported(one_b)
        log("waves: 4 waves of 100 conversations through the Space, two 1B entries")
        save("waves", waves.measure([one_b.q4, one_b.q4], args.work / "waves"))
    if "soak" in args.sections:
        one_b = Paths(args.work, "1b")
        ensure_exported(one_b)
        log("soak: 30 minutes of a changing crowd through the Space")
        save("soak", soak.measure(one_b.q4, args.work / "soak", minutes=30))
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
