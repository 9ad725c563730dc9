"""The report of a comparison: compare.md (settings, a summary table with one column per model, the answers side by
side), compare.json (every raw figure) and compare.png (bar charts of the headline figures), written atomically.

    write_report(Path("outputs/compare"), report)   # report: what compare.cli.run returns
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from common.files import remove_stale_temporaries, temporary_path
from common.formats import format_number, format_size

FILES = ("compare.md", "compare.json", "compare.png")


# ---------------------------------------------------------------------- markdown
def table_cell(text: str) -> str:
    """Text that stays inside one cell of a Markdown table: HTML escaped, '|' escaped, line breaks as <br>.

    >>> table_cell("a | b\\n<b>bold</b>\\n\\n")
    'a \\\\| b<br>&lt;b&gt;bold&lt;/b&gt;'
    """
    text = "".join(character for character in text if character in "\n\t" or character.isprintable())
    text = html.escape(text.strip(), quote=False).replace("|", "\\|")
    return "<br>".join(text.splitlines())


def describe_answer(answer: Mapping) -> str:
    """One answer's figures on one line (its length, how it ended, its timings), or its error.

    >>> describe_answer({"answer_tokens": 40, "finish_reason": "stop", "ttft_s": 0.25, "tokens_per_s": 20.0})
    '40 tokens · stopped at eot · TTFT 0.25 s · 20.0 tok/s'
    >>> describe_answer({"answer_tokens": 0, "finish_reason": "error", "error": "boom"})
    'error: boom'
    """
    if answer.get("error"):
        return f"error: {answer['error']}"
    stop = "stopped at eot" if answer["finish_reason"] == "stop" else f"cut at the limit ({answer['finish_reason']})"
    return (f"{answer['answer_tokens']} tokens · {stop} · TTFT {format_number(answer['ttft_s'], '{:.2f}', ' s')} · "
            f"{format_number(answer['tokens_per_s'], '{:.1f}', ' tok/s')}")


def render_markdown(report: Mapping) -> str:
    """The report: what was measured and how, a summary table (one column per model), the answers side by side."""
    models, settings, machine = report["models"], report["settings"], report["machine"]
    labels = [model["label"] for model in models]
    heldout = settings["heldout"]
    lines = [
        f"# GGUF comparison: {' vs '.join(labels)}",
        "",
        f"Measured by `scripts/compare.py` on {report['created']} on {machine['cpu']} ({machine['cores']} cores, "
        f"{settings['n_threads']} threads used), llama-cpp-python {report['versions']['llama_cpp_python']}, "
        f"Python {report['versions']['python']}; {report['wall_s']:.0f} s in all. Load average at the start "
        f"{machine['load_average']} (other processes on these cores slow every timing)."
        + (f" {machine['llama_cpp']}." if "llama_cpp" in machine else ""),
        "Each model is served as the Space serves it (`space/engine.py`'s streaming path, without the web page): its "
        f"GGUF's own chat template, n_ctx {settings['n_ctx']}, one model answering at a time.",
        "",
        f"- **Held-out perplexity** (lower is better): exp of the mean negative log-likelihood of the assistant tokens "
        f"(each answer and its `<|eot_id|>`, the tokens training puts loss on) of {heldout['conversations']} "
        f"conversations, from the GGUF's own logits. Held-out set: {heldout['description']}.",
        f"- **Answers** to {len(report['prompts'])} prompts (`{settings['prompts_file']}`): temperature "
        f"{settings['temperature']}, top_p {settings['top_p']}, at most {settings['max_tokens']} new tokens, seed "
        f"{settings['seed']}. Time to first token counts from the request, as in the Space; tokens/s is "
        "the decoding rate after the first token; both are timed on the tokens as they are sampled (the Space's own "
        "figures, from streamed text, are in compare.json). 'Stopped at eot' means the answer ended with "
        "`<|eot_id|>` before the token limit; answer length counts the tokens before it.",
        "",
        "## Summary",
        "",
        "| | " + " | ".join(table_cell(label) for label in labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]

    def row(name: str, values: Iterable[str]) -> None:
        lines.append(f"| {name} | " + " | ".join(values) + " |")

    row("Held-out perplexity", (format_number(m["heldout"]["perplexity"]) for m in models))
    row("Conversations / assistant tokens scored",
        (f"{m['heldout']['conversations']} / {m['heldout']['scored_tokens']:,}"
         + (f" ({m['heldout']['truncated']} cut at n_ctx)" if m["heldout"]["truncated"] else "") for m in models))
    row("Time to first token, median",
        (format_number(m["generation"]["ttft_median_s"], "{:.2f}", " s") for m in models))
    row("Tokens/s, median", (format_number(m["generation"]["tokens_per_s_median"], "{:.1f}") for m in models))
    row("Answers stopped at eot",
        (f"{format_number(m['generation']['eot_share'], '{:.0%}')} ({m['generation']['stopped_at_eot']}/"
         f"{m['generation']['answers'] - m['generation']['errors']})" for m in models))
    row("Mean answer length",
        (format_number(m["generation"]["mean_answer_tokens"], "{:.0f}", " tokens") for m in models))
    row("Errors", (str(m["generation"]["errors"]) for m in models))
    row("GGUF size", (format_size(m["size_bytes"]) for m in models))
    row("Load time", (format_number(m["load_s"], "{:.1f}", " s") for m in models))
    row("Source", (table_cell(f"`{m['source']}`") for m in models))
    lines += ["", "![Headline figures per model](compare.png)", "", "## Answers", ""]

    for number, prompt in enumerate(report["prompts"], 1):
        title = f"### {number}. {prompt['category']}" if prompt.get("category") else f"### {number}."
        lines += [f"{title} (`{prompt['id']}`)", ""]
        if prompt.get("system"):
            lines += [f"*System prompt:* {table_cell(prompt['system'])}", ""]
        for turn in prompt.get("history", []):
            lines += [f"*Earlier {turn['role']} turn:* {table_cell(turn['content'])}", ""]
        lines += ["> " + line for line in prompt["prompt"].splitlines()] + [""]
        answers = [next(a for a in m["generation"]["per_prompt"] if a["id"] == prompt["id"]) for m in models]
        lines.append("| " + " | ".join(table_cell(label) for label in labels) + " |")
        lines.append("|" + "---|" * len(labels))
        lines.append("| " + " | ".join(table_cell(a["text"]) or "*(empty)*" for a in answers) + " |")
        lines.append("| " + " | ".join(f"*{table_cell(describe_answer(a))}*" for a in answers) + " |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------- writing
def write_chart(report: Mapping, path: Path) -> None:
    """The headline figures as bar charts, one panel each with one bar per model, in a PNG at `path`."""
    import matplotlib  # imported here: only writing the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    models = report["models"]
    labels = [model["label"] for model in models]
    panels = [
        ("Held-out perplexity (lower is better)", [m["heldout"]["perplexity"] for m in models], "{:,.2f}"),
        ("Time to first token, median (s)", [m["generation"]["ttft_median_s"] for m in models], "{:.2f}"),
        ("Tokens/s, median", [m["generation"]["tokens_per_s_median"] for m in models], "{:.1f}"),
        ("Answers stopped at eot (%)",
         [None if m["generation"]["eot_share"] is None else 100 * m["generation"]["eot_share"] for m in models],
         "{:.0f}"),
        ("Mean answer length (tokens)", [m["generation"]["mean_answer_tokens"] for m in models], "{:.0f}"),
        ("GGUF size (MB)", [None if m["size_bytes"] is None else m["size_bytes"] / 1e6 for m in models], "{:,.0f}"),
    ]
    figure, axes = plt.subplots(2, 3, figsize=(12, 6.5), dpi=100)
    colors = [plt.get_cmap("tab10")(index % 10) for index in range(len(labels))]
    for axis, (title, values, pattern) in zip(axes.flat, panels):
        heights = [0 if value is None else value for value in values]
        bars = axis.bar(range(len(labels)), heights, color=colors)
        axis.set_xticks(range(len(labels)), labels, rotation=15 if len(labels) > 3 else 0)
        axis.set_title(title, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
        for bar, value in zip(bars, values):
            axis.annotate("–" if value is None else pattern.format(value), (bar.get_x() + bar.get_width() / 2,
                          bar.get_height()), ha="center", va="bottom", fontsize=9)
        axis.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:,.0f}" if abs(y) >= 100 else f"{y:g}"))
        if title.endswith("(%)"):
            axis.set_ylim(0, 110)
        else:
            axis.margins(y=0.15)
    figure.suptitle(f"{' vs '.join(labels)}: {report['machine']['cpu']}, {report['settings']['n_threads']} threads",
                    fontsize=11)
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)


def write_report(out: Path, report: dict) -> list[Path]:
    """compare.md, compare.json and compare.png, each written under a temporary name and renamed when all three
    are complete, so a failure never leaves a partial report under the final names."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # what a killed run left
    finals = [out / name for name in FILES]
    temporaries = [temporary_path(final) for final in finals]
    try:
        temporaries[0].write_text(render_markdown(report) + "\n", encoding="utf-8")
        temporaries[1].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        write_chart(report, temporaries[2])
        for temporary, final in zip(temporaries, finals):
            os.replace(temporary, final)
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
    return finals
