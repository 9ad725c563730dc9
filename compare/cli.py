"""Compare GGUF chat models as the Space serves them: held-out perplexity, speed, stopping, answers side by side.

    python scripts/compare.py --model 1B=USER/Llama-3.2-1B-Instruct-FineTome-GGUF \\
                              --model 3B=USER/Llama-3.2-3B-Instruct-FineTome-GGUF --out reports/1b-vs-3b
    python scripts/compare.py --model q4=exports/tiny/Tiny-Llama-3.2-FineTome-Q4_K_M.gguf \\
                              --model q8=exports/tiny/Tiny-Llama-3.2-FineTome-Q8_0.gguf --max-tokens 64
    python scripts/compare.py --model 1B=… --heldout outputs/llama-3.2-1b-finetome   # that run's own eval split
    python scripts/compare.py leaderboard votes/      # the arena ratings of the Space's blind votes (space/ratings.py)

A model is LABEL=PATH (a local .gguf) or LABEL=OWNER/NAME[:GLOB] (a Hub repo and a glob matching one GGUF in it,
default *Q4_K_M.gguf, downloaded into the huggingface_hub cache as the Space does). Writes into --out:
compare.md (the report), compare.json (every raw figure, per conversation and per prompt) and compare.png (bar
charts of the headline figures).

Every model runs through space/engine.py's Engine with the Space's settings (the GGUF's own chat template, n_ctx,
threads from the CPU affinity, the prompt cache) and, for the answers, the Space's default sampling with a fixed
seed, so the figures are what a Space user gets:
- held-out perplexity: exp of the mean negative log-likelihood of the assistant tokens (each answer plus its
  <|eot_id|>: exactly the tokens training puts loss on, found by train/conversations.py's own assistant_spans) of held-out
  FineTome-format conversations, from the GGUF's own logits, one conversation at a time;
- per prompt: time to first token, tokens/s, whether the answer stopped at <|eot_id|> before --max-tokens, its
  length in tokens, and its text.
Scoring keeps every logit row of a conversation: n_vocab × 4 bytes (0.5 MB for Llama 3) per token of the longest
one, at most --n-ctx tokens (2 GB at 4096).

This module holds the command line (main) and the run that measures every model in turn; the settings, their flags
and their checks are compare.config's CompareConfig, the measuring itself is in compare.heldout and compare.prompts,
the report in compare.report. The `leaderboard` subcommand prints the arena ratings of vote logs (a file, or a folder
of them) as the Space's Leaderboard tab shows them.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from common.cli import UsageError, UsageParser, report_problem
from common.formats import format_number
from common.llama_runtime import extra_buffers
from common.llama3 import TEMPLATE_DATE
from common.log import stage_logger
from common.machine import cpu_name, usable_cpus
from export.errors import ExportError
from space.engine import Engine
from space.ratings import ROUNDS, format_leaderboard, leaderboard, read_votes

from .config import CompareConfig, config_from_args
from .heldout import score_heldout
from .models import describe_source, load_models
from .prompts import generate_answers
from .report import write_report

log = stage_logger("compare").info


# ---------------------------------------------------------------------- the run
def machine_info() -> dict:
    """The CPU's name and core counts, and llama.cpp's path on it, for the report's header."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "usable_cores": usable_cpus(),
            "llama_cpp": extra_buffers().describe(), "system": f"{platform.system()} {platform.release()}",
            "load_average": round(os.getloadavg()[0], 2)}  # 1 minute: others busy on these cores slow the timings


# A model behind an OpenAI-compatible server: its held-out perplexity needs its logits, which the API does not give.
NOT_SCORED = {"perplexity": None, "conversations": 0, "tokens": 0, "scored_tokens": 0, "truncated": 0,
              "negative_log_likelihood": None, "seconds": 0.0, "per_conversation": [],
              "not_scored": "served over the OpenAI API, which gives no logits to score"}


def run(config: CompareConfig) -> dict:
    """Measure every model in turn and return the report (every figure, no file written)."""
    started, created, machine = time.perf_counter(), datetime.now(timezone.utc), machine_info()
    engine = Engine(config.models, n_ctx=config.n_ctx, seed=config.seed)
    heldout, prompts = config.heldout_set, config.prompt_list
    log(f"compare: {len(config.models)} model(s), {len(heldout.conversations)} held-out conversations, "
        f"{len(prompts)} prompts, {engine.n_threads} threads")
    if heldout.skipped:
        log(f"compare: {len(heldout.skipped)} held-out rows left out (first: row {heldout.skipped[0][0]}: "
            f"{heldout.skipped[0][1]})")
    load_s = load_models(engine, config.models)
    models = []
    for spec in config.models:
        llm = None if spec.is_remote else engine.get(spec.label)
        scored = NOT_SCORED if spec.is_remote else score_heldout(engine, spec.label, heldout.conversations, config.n_ctx)
        log(f"[{spec.label}] held-out perplexity {format_number(scored['perplexity'])} over "
            f"{scored['scored_tokens']:,} assistant tokens ({scored['seconds']:.1f} s); answering "
            f"{len(prompts)} prompts")
        generation = generate_answers(engine, spec.label, prompts, config.sampling)
        models.append({"label": spec.label, "source": describe_source(spec), "path": llm and llm.model_path,
                       "size_bytes": llm and Path(llm.model_path).stat().st_size, "load_s": load_s[spec.label],
                       "n_vocab": llm and llm.n_vocab(), "heldout": scored, "generation": generation})
    try:
        llama_version = metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        import llama_cpp

        llama_version = llama_cpp.__version__
    sampling = config.sampling.clamped()
    return {
        "created": created.strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": machine,
        "versions": {"llama_cpp_python": llama_version, "python": platform.python_version()},
        "settings": {"n_ctx": config.n_ctx, "n_threads": engine.n_threads, "temperature": sampling.temperature,
                     "top_p": sampling.top_p, "max_tokens": sampling.max_new_tokens, "seed": config.seed,
                     "prompts_file": config.prompts_file, "template_date": TEMPLATE_DATE,
                     "heldout": {"description": heldout.description, "conversations": len(heldout.conversations),
                                 "skipped_rows": len(heldout.skipped)}},
        "prompts": [prompt.as_dict() for prompt in prompts],
        "models": models,
    }


# ---------------------------------------------------------------------- the leaderboard subcommand
def build_leaderboard_parser() -> UsageParser:
    parser = UsageParser(prog="python scripts/compare.py leaderboard",
                         description="The arena leaderboard of the Space's blind votes: Bradley-Terry ratings with "
                                     "bootstrap 95% intervals, win rates and vote counts per pair (space/ratings.py)")
    parser.add_argument("votes", nargs="+", metavar="VOTES",
                        help="a vote log (JSON Lines, as the Space writes votes/*.jsonl) or a folder of them (every "
                             "*.jsonl below it); several may be given")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help=f"bootstrap rounds for the intervals, 100-100000 (default: {ROUNDS})")
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's seed (default: 0)")
    return parser


def leaderboard_main(argv: Sequence[str]) -> int:
    """`leaderboard VOTES…`: print the table (exit 0); exit 2 on a mistake in the arguments, 1 when the files hold no
    vote or cannot be read, each with one `error:` line."""
    try:
        args = build_leaderboard_parser().parse_args(argv)
        problems = [f"VOTES {path!r}: no such file or folder; give a vote log (the Space's votes/*.jsonl) or the "
                    "folder holding them" for path in args.votes if not Path(path).exists()]
        if not 100 <= args.rounds <= 100_000:
            problems.append(f"--rounds {args.rounds}: must be between 100 and 100000")
        if problems:
            raise UsageError(problems)
    except UsageError as error:
        return error.report()
    try:
        votes = read_votes(args.votes)
    except OSError as error:
        return report_problem(error)
    if not votes.battles:
        skipped = f" ({votes.corrupt} corrupt line(s) skipped, first: {votes.problems[0]})" if votes.corrupt else ""
        return report_problem(ValueError(f"no votes in {', '.join(args.votes)}{skipped}; vote in the Space's Compare "
                                         "tab, or give its votes/ folder"))
    print(format_leaderboard(leaderboard(votes, rounds=args.rounds, seed=args.seed)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: check the arguments (exit 2 on a mistake), measure, write the report (exit 0), or exit 1
    with one `error:` line when a model cannot be had. `leaderboard VOTES…` prints the arena ratings instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["leaderboard"]:
        return leaderboard_main(argv[1:])
    try:
        config = config_from_args(argv)
    except UsageError as error:
        return error.report()
    try:
        report = run(config)
    except ExportError as error:
        return report_problem(error)
    files = write_report(config.out_dir, report)
    for model in report["models"]:
        log(f"[{model['label']}] perplexity {format_number(model['heldout']['perplexity'])}, TTFT median "
            f"{format_number(model['generation']['ttft_median_s'], '{:.2f}', ' s')}, "
            f"{format_number(model['generation']['tokens_per_s_median'], '{:.1f}')} tok/s, "
            f"{format_number(model['generation']['eot_share'], '{:.0%}')} stopped at eot")
    log(f"compare: done in {report['wall_s']:.0f} s; wrote:")
    for path in files:
        log(f"  {path}  ({path.stat().st_size:,} bytes)")
    return 0
