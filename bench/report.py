"""The report of a run: docs/benchmarks.md (every figure, its runs, the method), docs/benchmarks.png (the chart) and
the targets table between README.md's benchmark markers, all from docs/benchmarks.json.

    python scripts/bench.py --render-only    # rewrite them from docs/benchmarks.json, measuring nothing
"""

from __future__ import annotations

import os
from pathlib import Path

from bench import REPO, concurrency, imatrix, log, soak, startup, training, waves
from bench.summary import gb, misses, summary, targets_table
from common.files import temporary_path, write_text_atomic
from common.machine import usable_cpus

DOCS = REPO / "docs"
REPORT, CHART, RESULTS = DOCS / "benchmarks.md", DOCS / "benchmarks.png", DOCS / "benchmarks.json"
README = REPO / "README.md"
README_BEGIN, README_END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def render_chart(s: dict, path: Path) -> None:
    """The six panels of docs/benchmarks.png: generation vs its bound, the Space's overhead, TTFT by turn, export
    memory, and N users at once (tokens/s in all, slowest first token) for the engine and llama-server (a panel whose
    section is absent stays empty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(12, 12.5))
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
    if "concurrency" in s:
        figures = s["concurrency"]
        for ax, key, label in ((axes[2][0], "aggregate_tokens_per_s", "tokens/s, all users together"),
                               (axes[2][1], "ttft_p95_s", "time to first token, p95 (s)")):
            for name, marker in (("engine", "o"), ("llama-server", "s")):
                users = sorted(figures[name])
                ax.plot(users, [figures[name][n][key] for n in users], marker=marker, label=name)
            ax.set_xticks(users)
            ax.set_xlabel("users at once (1B q4_k_m, 128 new tokens each)")
            ax.set_ylabel(label)
            ax.set_ylim(bottom=0)
            ax.set_title("N users: the Space's engine vs llama-server")
            ax.legend()
    fig.suptitle("Measured on " + s.get("machine_line", "this machine"), fontsize=10)
    fig.tight_layout()
    temporary = temporary_path(path)
    fig.savefig(temporary, dpi=110, format="png")  # the temporary name does not end in .png
    plt.close(fig)
    os.replace(temporary, path)


def _runs(values, fmt: str = "{:.1f}") -> str:
    """The runs behind a median, as the report lists them.

    >>> _runs([33.04, 35.5], "{:.2f}")
    '33.04, 35.50'
    """
    return ", ".join(fmt.format(v) for v in values)


def render_report(results: dict, s: dict) -> str:
    """docs/benchmarks.md: the targets, then each measured section with its method, medians and runs."""
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
                  "| × turn 1 | " + " | ".join(f"{t / ss['ttft'][0]:.2f}" for t in ss["ttft"]) + " |",
                  "| runs (s) | " + " | ".join(_runs([c[i]["ttft_s"] for c in sp["conversations"]], "{:.2f}")
                                               for i in range(len(ss["ttft"]))) + " |",
                  "| prompt tokens read (of the prompt) | " + " | ".join(
                      _runs([c[i].get("prompt_read") or 0 for c in sp["conversations"]], "{:.0f}") + " (of "
                      + _runs([c[i].get("prompt_tokens") or 0 for c in sp["conversations"]], "{:.0f}") + ")"
                      for i in range(len(ss["ttft"]))) + " |", ""]
        if sp.get("crowd"):
            crowd = sp["crowd"]
            lines += [f"{crowd[0]['users']} users at once through the Space (gradio_client, different prompts sent "
                      f"together, {sp['new_tokens']} new tokens each, temperature 0): time to first token p50 "
                      + _runs([r["ttft_p50_s"] for r in crowd], "{:.2f}") + " s, p95 "
                      + _runs([r["ttft_p95_s"] for r in crowd], "{:.2f}") + " s; "
                      + _runs([r["aggregate_tokens_per_s"] for r in crowd]) + " tokens/s in all (runs).", ""]
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
        lines += [training.render(t, t["measured"], f"python scripts/bench.py --sections training --repeats "
                                                    f"{t['repeats']}", results.get("machine")), ""]
    if "startup" in sections:
        lines += startup.render(sections["startup"])
    if "concurrency" in sections:
        lines += concurrency.render(sections["concurrency"])
    if "waves" in sections:
        lines += waves.render(sections["waves"])
    if "soak" in sections:
        lines += soak.render(sections["soak"])
    if "buffers" in sections:
        b, sb = sections["buffers"], s["buffers"]
        lines += ["## llama.cpp's extra buffer types: the cost of the AMX safe path", "",
                  f"Measured {b['measured']} on {b['cpu']} (`python scripts/bench.py --sections buffers --repeats "
                  f"{len(b['runs']['on'])}`): the 1B-shaped q4_k_m through `common/llama_runtime.py` with "
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


def readme_block(results: dict, s: dict) -> str:
    """README.md's benchmark block, markers included: where and how it was measured, and the targets table."""
    return "\n".join([
        README_BEGIN,
        f"Measured on {s['machine_line']} by `python scripts/bench.py` "
        "(details, raw figures and the chart in [docs/benchmarks.md](docs/benchmarks.md)):",
        "",
        targets_table(s),
        README_END,
    ])


def measured_span(results: dict) -> str:
    """When the report's figures were measured: a section measured alone (--sections) keeps its own date, so the
    report spans the first to the last of them.

    >>> measured_span({"date": "2026-12-03", "sections": {"a": {"measured": "2026-11-21 07:43"}, "b": {}}})
    '2026-11-21 to 2026-12-03'
    >>> measured_span({"date": "2026-12-03", "sections": {"a": {"measured": "2026-12-03 05:36"}}})
    '2026-12-03'
    """
    days = sorted({figures["measured"][:10] for figures in results.get("sections", {}).values()
                   if isinstance(figures, dict) and figures.get("measured")} | {results["date"]})
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def write_outputs(results: dict) -> None:
    """docs/benchmarks.md, docs/benchmarks.png and README.md's benchmark block, from the raw `results`."""
    s = summary(results)
    m = results["machine"]
    s["machine_line"] = (f"{m['cpu']}, {m['cores']} usable cores, {m['ram_gb']:.0f} GiB RAM, no GPU "
                         f"(torch {m['torch']}, transformers {m['transformers']}, llama-cpp-python "
                         f"{m['llama_cpp_python']}), {measured_span(results)}")
    DOCS.mkdir(exist_ok=True)
    render_chart(s, CHART)
    report = imatrix.keep_section(render_report(results, s), REPORT)  # its own script's section
    # Sections measured by hand (the DPO step: train/run.py, no bench step yet) are kept between their markers.
    report = imatrix.keep_section(report, REPORT, "<!-- dpo:begin -->", "<!-- dpo:end -->")
    write_text_atomic(REPORT, report)
    readme = README.read_text()
    if README_BEGIN in readme:
        write_text_atomic(README, training.replace_section(readme, readme_block(results, s), README_BEGIN,
                                                           README_END))
    log(f"wrote {REPORT.relative_to(REPO)}, {CHART.relative_to(REPO)}, {RESULTS.relative_to(REPO)}")
