"""Compare GGUF chat models as the Space serves them: held-out perplexity, speed, stopping, answers side by side.

    python scripts/compare.py --model 1B=USER/Llama-3.2-1B-Instruct-FineTome-GGUF \\
                              --model 3B=USER/Llama-3.2-3B-Instruct-FineTome-GGUF --out reports/1b-vs-3b
    python scripts/compare.py --model q4=exports/tiny/Tiny-Llama-3.2-FineTome-Q4_K_M.gguf \\
                              --model q8=exports/tiny/Tiny-Llama-3.2-FineTome-Q8_0.gguf --max-tokens 64
    python scripts/compare.py --model 1B=… --heldout outputs/llama-3.2-1b-finetome   # that run's own eval split
    python scripts/compare.py leaderboard votes/      # the arena ratings of the Space's blind votes (compare.ratings)

A model is LABEL=PATH (a local .gguf) or LABEL=OWNER/NAME[:GLOB] (a Hub repo and a glob matching one GGUF in it,
default *Q4_K_M.gguf, downloaded into the huggingface_hub cache as the Space does). Writes into --out:
compare.md (the report), compare.json (every raw figure, per conversation and per prompt) and compare.png (bar
charts of the headline figures).

Every model runs through space/engine.py's Engine with the Space's settings (the GGUF's own chat template, n_ctx,
threads from the CPU affinity, the prompt cache) and, for the answers, the Space's default sampling with a fixed
seed, so the figures are what a Space user gets:
- held-out perplexity: exp of the mean negative log-likelihood of the assistant tokens (each answer plus its
  <|eot_id|>: exactly the tokens training puts loss on, found by train/data.py's own assistant_spans) of held-out
  FineTome-format conversations, from the GGUF's own logits, one conversation at a time;
- per prompt: time to first token, tokens/s, whether the answer stopped at <|eot_id|> before --max-tokens, its
  length in tokens, and its text.
Scoring keeps every logit row of a conversation: n_vocab × 4 bytes (0.5 MB for Llama 3) per token of the longest
one, at most --n-ctx tokens (2 GB at 4096).

This module holds the command line (the config, its checks, main) and the run that measures every model in turn;
the measuring itself is in compare.heldout and compare.prompts, the report in compare.report. The `leaderboard`
subcommand prints the arena ratings of vote logs (a file, or a folder of them) as the Space's Leaderboard tab shows
them.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from common.cli import UsageError, UsageParser, report_problem
from common.llama import extra_buffers
from common.llama3 import TEMPLATE_DATE
from common.log import stage_logger
from common.machine import cpu_name, usable_cpus
from export.errors import ExportError
from space.catalog import ModelSpec
from space.engine import DEFAULT_N_CTX, Engine
from space.replies import Sampling
from train.data import DataError

from .heldout import HeldOut, load_heldout, score_heldout
from .models import DEFAULT_GLOB, check_model_arguments, describe_source, load_models
from .prompts import DEFAULT_PROMPTS, PROMPT_EXAMPLE, REPO, Prompt, generate_answers, load_prompts
from .ratings import ROUNDS, format_leaderboard, leaderboard, read_votes
from .report import FILES, format_number, write_report

DEFAULT_OUT = "outputs/compare"
SAMPLING = Sampling()  # the Space's slider defaults
SPACE_N_CTX = DEFAULT_N_CTX  # the Space's context (space/app.py --n-ctx)

log = stage_logger("compare").info


# ---------------------------------------------------------------------- command line
@dataclass
class CompareConfig:
    """Everything one comparison needs, checked: the models, the prompts and held-out set (already read), the
    output folder and the sampling and context settings (the Space's defaults unless given)."""

    models: list[ModelSpec]
    prompts: list[Prompt]
    heldout: HeldOut
    out: Path
    prompts_file: str
    max_tokens: int = SAMPLING.max_new_tokens
    temperature: float = SAMPLING.temperature
    top_p: float = SAMPLING.top_p
    seed: int = 3407
    n_ctx: int = SPACE_N_CTX
    max_conversations: int | None = None

    @property
    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_tokens)


def build_parser() -> UsageParser:
    parser = UsageParser(prog="python scripts/compare.py", description=__doc__.splitlines()[0],
                         epilog="python scripts/compare.py leaderboard VOTES… prints the arena ratings of the "
                                "Space's vote logs instead (leaderboard --help)")
    parser.add_argument("--model", action="append", default=[], metavar="LABEL=PATH_OR_REPO",
                        help="a model to compare (repeatable): LABEL=path/to/X.gguf or LABEL=USER/NAME[:GLOB] "
                             f"(a Hub repo; GLOB defaults to {DEFAULT_GLOB})")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help=f"JSON Lines of prompts (default: {DEFAULT_PROMPTS.relative_to(REPO)}), one per line: "
                             f"{PROMPT_EXAMPLE}")
    parser.add_argument("--heldout", default=None, metavar="FILE_OR_RUN",
                        help="held-out conversations: a FineTome-format .jsonl file, or a training run's output "
                             "folder (its eval split, from run.json); default: the tiny preset's eval split of "
                             "train/data/finetome_sample.jsonl")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"folder for {', '.join(FILES)} (default: {DEFAULT_OUT})")
    parser.add_argument("--max-tokens", type=int, default=SAMPLING.max_new_tokens,
                        help=f"most new tokens per answer, 16-1024 as the Space allows "
                             f"(default: {SAMPLING.max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=SAMPLING.temperature,
                        help=f"sampling temperature, 0-2; 0 = greedy (default: the Space's {SAMPLING.temperature})")
    parser.add_argument("--top-p", type=float, default=SAMPLING.top_p,
                        help=f"nucleus sampling, 0.05-1 (default: the Space's {SAMPLING.top_p})")
    parser.add_argument("--seed", type=int, default=3407,
                        help="sampling seed: the same models, prompts and seed give the same answers (default: 3407)")
    parser.add_argument("--n-ctx", type=int, default=SPACE_N_CTX,
                        help=f"context length, as the Space's (default: {SPACE_N_CTX}); longer held-out "
                             "conversations are cut there")
    parser.add_argument("--max-conversations", type=int, default=None, metavar="N",
                        help="score only the first N held-out conversations (default: all)")
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> CompareConfig:
    """Parse and check every argument; UsageError with one line per problem, all of them at once."""
    args = build_parser().parse_args(argv)
    problems: list[str] = []

    models, model_problems = check_model_arguments(args.model)
    problems += model_problems

    prompts: list[Prompt] = []
    prompts_file = Path(args.prompts).expanduser() if args.prompts else DEFAULT_PROMPTS
    if args.prompts and not prompts_file.is_file():
        problems.append(f"--prompts {args.prompts!r}: no such file; give a JSON Lines file like "
                        f"{DEFAULT_PROMPTS.relative_to(REPO)}")
    else:
        try:
            prompts = load_prompts(prompts_file)
        except ValueError as error:
            problems.append(f"--prompts {str(args.prompts or prompts_file)!r}: {error}")

    heldout = None
    try:
        heldout = load_heldout(args.heldout)
    except (ValueError, DataError) as error:
        problems.append(f"--heldout {args.heldout!r}: {error}" if args.heldout else f"held-out set: {error}")

    for flag, value, low, high in (("--max-tokens", args.max_tokens, 16, 1024), ("--temperature", args.temperature, 0, 2),
                                   ("--top-p", args.top_p, 0.05, 1)):
        if not (math.isfinite(value) and low <= value <= high):
            problems.append(f"{flag} {value}: must be between {low} and {high} (the Space's range)")
    if not 1 <= args.seed < 2**31:
        problems.append(f"--seed {args.seed}: must be between 1 and {2**31 - 1} (llama-cpp-python treats 0 as 'unset')")
    if args.n_ctx < 2 * max(args.max_tokens, 16):
        problems.append(f"--n-ctx {args.n_ctx}: must be at least twice --max-tokens ({2 * args.max_tokens}): the "
                        "Space gives an answer at most half the context")
    if args.max_conversations is not None and args.max_conversations < 1:
        problems.append(f"--max-conversations {args.max_conversations}: must be at least 1 (leave it out for all)")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        problems.append(f"--out {args.out!r}: exists and is not a folder; give a folder path")
    if problems:
        raise UsageError(problems)
    if args.max_conversations:
        heldout.conversations = heldout.conversations[: args.max_conversations]
    return CompareConfig(models=models, prompts=prompts, heldout=heldout, out=out, prompts_file=str(args.prompts or
                         DEFAULT_PROMPTS.relative_to(REPO)), max_tokens=args.max_tokens, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed, n_ctx=args.n_ctx, max_conversations=args.max_conversations)


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
    heldout = config.heldout
    log(f"compare: {len(config.models)} model(s), {len(heldout.conversations)} held-out conversations, "
        f"{len(config.prompts)} prompts, {engine.n_threads} threads")
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
            f"{len(config.prompts)} prompts")
        generation = generate_answers(engine, spec.label, config.prompts, config.sampling)
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
        "prompts": [prompt.as_dict() for prompt in config.prompts],
        "models": models,
    }


# ---------------------------------------------------------------------- the leaderboard subcommand
def build_leaderboard_parser() -> UsageParser:
    parser = UsageParser(prog="python scripts/compare.py leaderboard",
                         description="The arena leaderboard of the Space's blind votes: Bradley-Terry ratings with "
                                     "bootstrap 95% intervals, win rates and vote counts per pair (compare/ratings.py)")
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
    files = write_report(config.out, report)
    for model in report["models"]:
        log(f"[{model['label']}] perplexity {format_number(model['heldout']['perplexity'])}, TTFT median "
            f"{format_number(model['generation']['ttft_median_s'], '{:.2f}', ' s')}, "
            f"{format_number(model['generation']['tokens_per_s_median'], '{:.1f}')} tok/s, "
            f"{format_number(model['generation']['eot_share'], '{:.0%}')} stopped at eot")
    log(f"compare: done in {report['wall_s']:.0f} s; wrote:")
    for path in files:
        log(f"  {path}  ({path.stat().st_size:,} bytes)")
    return 0
