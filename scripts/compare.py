#!/usr/bin/env python
"""Compare GGUF chat models as the Space serves them: held-out perplexity, speed, stopping, answers side by side.

    python scripts/compare.py --model 1B=USER/Llama-3.2-1B-Instruct-FineTome-GGUF \\
                              --model 3B=USER/Llama-3.2-3B-Instruct-FineTome-GGUF --out reports/1b-vs-3b
    python scripts/compare.py --model q4=exports/tiny/Tiny-Llama-3.2-FineTome-Q4_K_M.gguf \\
                              --model q8=exports/tiny/Tiny-Llama-3.2-FineTome-Q8_0.gguf --max-tokens 64
    python scripts/compare.py --model 1B=… --heldout outputs/llama-3.2-1b-finetome   # that run's own eval split

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
"""

from __future__ import annotations

import copy
import html
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

# Make the repo's packages importable when run as `python scripts/compare.py` from a fresh clone.
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

import numpy as np  # noqa: E402

from export.errors import ExportError  # noqa: E402
from common.llama import extra_buffers, open_gguf  # noqa: E402
from common.machine import cpu_name, usable_cpus  # noqa: E402
from common.cli import UsageError, UsageParser, first_line  # noqa: E402
from common.hub import looks_like_repo_id  # noqa: E402
from common.llama3 import Q4_K_M_GLOB, TEMPLATE_DATE  # noqa: E402
from common.log import stage_logger  # noqa: E402
from common.files import remove_stale_temporaries, temporary_path  # noqa: E402
from export.hub import hub_errors, validate_repo_id  # noqa: E402
from space.engine import Engine, ModelSpec, Sampling  # noqa: E402
from train.config import TrainConfig, load_preset, resolve_local_path  # noqa: E402
from train.data import (BadRow, DataError, assistant_spans, prepare, read_rows,  # noqa: E402
                        standardize_row)

DEFAULT_PROMPTS = REPO / "scripts" / "compare_prompts.jsonl"
DEFAULT_OUT = "outputs/compare"
DEFAULT_GLOB = Q4_K_M_GLOB  # the same convention as space/models.yaml and scripts/deploy_space.py
DEFAULT_HELDOUT_PRESET = "tiny"  # its eval split of the shipped sample; the published models never saw the sample
GGUF_MAGIC = b"GGUF"
MAX_PROMPT_CHARS = inspect.signature(Engine).parameters["max_message_chars"].default  # the Space's message limit
SPACE_N_CTX = inspect.signature(Engine).parameters["n_ctx"].default  # the Space's context (space/app.py --n-ctx)
SAMPLING = Sampling()  # the Space's slider defaults
LOGIT_ROWS_PER_CHUNK = 64  # rows of the logits turned into log-probabilities at a time (64 × 128256 float64 = 66 MB)
FILES = ("compare.md", "compare.json", "compare.png")


log = stage_logger("compare").info


# ---------------------------------------------------------------------- pure core


def parse_model_argument(text: str) -> ModelSpec:
    """`LABEL=PATH` (a local GGUF) or `LABEL=OWNER/NAME[:GLOB]` (a Hub repo) → ModelSpec; ValueError says what is wrong.

    An existing path is always local; otherwise OWNER/NAME with an optional :GLOB is a Hub repo, unless it ends
    in .gguf (then it is a local file that is missing, which the caller reports).

    >>> parse_model_argument("1B=alice/Llama-3.2-1B-Instruct-FineTome-GGUF")
    ModelSpec(label='1B', repo_id='alice/Llama-3.2-1B-Instruct-FineTome-GGUF', filename='*Q4_K_M.gguf', path=None)
    >>> parse_model_argument("q8 = alice/X-GGUF:*Q8_0.gguf").filename
    '*Q8_0.gguf'
    >>> parse_model_argument("tiny=exports/tiny/Tiny-Q4_K_M.gguf")
    ModelSpec(label='tiny', repo_id=None, filename=None, path='exports/tiny/Tiny-Q4_K_M.gguf')
    >>> parse_model_argument("exports/tiny/Tiny-Q4_K_M.gguf")
    Traceback (most recent call last):
    ValueError: expected LABEL=PATH_OR_REPO, e.g. 1B=exports/1b/X-Q4_K_M.gguf or 1B=USER/X-GGUF
    >>> parse_model_argument("1B=alice/X-GGUF:")
    Traceback (most recent call last):
    ValueError: empty glob after ':'; give one that matches one GGUF in the repo, e.g. alice/X-GGUF:*Q4_K_M.gguf
    """
    label, separator, value = text.partition("=")
    label, value = label.strip(), value.strip()
    if not separator or not label or not value:
        raise ValueError("expected LABEL=PATH_OR_REPO, e.g. 1B=exports/1b/X-Q4_K_M.gguf or 1B=USER/X-GGUF")
    if any(character in label for character in "\n\r\t|"):
        raise ValueError("a label may not contain tabs, line breaks or '|' (it heads a column of the report)")
    if Path(value).expanduser().exists():
        return ModelSpec(label=label, path=value)
    repo, colon, glob = value.partition(":")
    if repo.lower().endswith(".gguf") or value.startswith((".", "/", "~")) or not looks_like_repo_id(repo):
        return ModelSpec(label=label, path=value)  # a local path: the caller reports it if it is missing
    if colon and not glob.strip():
        raise ValueError(f"empty glob after ':'; give one that matches one GGUF in the repo, e.g. {repo}:{DEFAULT_GLOB}")
    return ModelSpec(label=label, repo_id=repo, filename=glob.strip() or DEFAULT_GLOB)


def describe_source(spec: ModelSpec) -> str:
    """Where a model comes from, as one would type it.

    >>> describe_source(ModelSpec("1B", repo_id="alice/X-GGUF", filename="*Q4_K_M.gguf"))
    'alice/X-GGUF:*Q4_K_M.gguf'
    >>> describe_source(ModelSpec("tiny", path="exports/tiny/X.gguf"))
    'exports/tiny/X.gguf'
    """
    return spec.path if spec.path else f"{spec.repo_id}:{spec.filename}"


def assistant_token_mask(pieces: Sequence[bytes], text: str, spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Which tokens training puts loss on, given each token's bytes, the rendered text and its assistant spans.

    The rule of train/data.py's tokenize_conversation on the tokenizer's own character offsets: a token counts when
    it starts inside a span (from the end of an assistant header to the end of that turn's <|eot_id|>). llama.cpp
    gives no offsets, so here they come from the tokens' bytes, which must spell the text exactly.

    >>> text = "<s>user: hi é<e>bot: oh<e>"
    >>> pieces = [b"<s>", b"user", b":", b" hi", b" \\xc3", b"\\xa9", b"<e>", b"bot", b":", b" oh", b"<e>"]
    >>> start = text.index(" oh"); spans = [(start, len(text))]
    >>> [piece.decode() for piece, keep in zip(pieces, assistant_token_mask(pieces, text, spans)) if keep]
    [' oh', '<e>']
    >>> assistant_token_mask([b"<s>"], text, spans)
    Traceback (most recent call last):
    ValueError: the tokens do not spell the rendered text (3 of 27 bytes); cannot locate the assistant tokens
    """
    encoded = text.encode("utf-8")
    total = sum(len(piece) for piece in pieces)
    if total != len(encoded) or b"".join(pieces) != encoded:
        raise ValueError(f"the tokens do not spell the rendered text ({total} of {len(encoded)} bytes); "
                         "cannot locate the assistant tokens")
    byte_spans = [(len(text[:start].encode("utf-8")), len(text[:end].encode("utf-8"))) for start, end in spans]
    mask, offset = [], 0
    for piece in pieces:
        mask.append(bool(piece) and any(start <= offset < end for start, end in byte_spans))
        offset += len(piece)
    return mask


def token_log_probs(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """log softmax(logits[i])[targets[i]] for each row, computed in float64.

    >>> token_log_probs(np.array([[0.0, 0.0], [math.log(3), 0.0]], dtype=np.float32), [1, 0]).round(4).tolist()
    [-0.6931, -0.2877]
    """
    rows = np.asarray(logits, dtype=np.float64)
    peak = rows.max(axis=1, keepdims=True)
    log_totals = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]
    return rows[np.arange(len(rows)), np.asarray(targets)] - log_totals


def perplexity(negative_log_likelihood: float, tokens: int) -> float | None:
    """exp(mean negative log-likelihood per token); None when nothing was scored.

    >>> round(perplexity(3 * math.log(4), 3), 6)
    4.0
    >>> perplexity(0.0, 0) is None
    True
    """
    return math.exp(negative_log_likelihood / tokens) if tokens else None


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None (None if there are none).

    >>> median([3.0, None, 1.0, 2.0]), median([None])
    (2.0, None)
    """
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def summarize_answers(answers: Sequence[Mapping]) -> dict:
    """The headline generation figures of one model's answers.

    >>> summarize_answers([
    ...     {"ttft_s": 0.25, "tokens_per_s": 20.0, "finish_reason": "stop", "answer_tokens": 40},
    ...     {"ttft_s": 0.75, "tokens_per_s": 30.0, "finish_reason": "length", "answer_tokens": 256},
    ...     {"ttft_s": None, "tokens_per_s": None, "finish_reason": "error", "answer_tokens": 0, "error": "boom"}])
    {'answers': 3, 'errors': 1, 'ttft_median_s': 0.5, 'tokens_per_s_median': 25.0, 'stopped_at_eot': 1, 'eot_share': 0.5, 'mean_answer_tokens': 148.0}
    """
    answered = [answer for answer in answers if not answer.get("error")]
    stopped = sum(answer["finish_reason"] == "stop" for answer in answered)
    return {
        "answers": len(answers),
        "errors": len(answers) - len(answered),
        "ttft_median_s": median(answer["ttft_s"] for answer in answered),
        "tokens_per_s_median": median(answer["tokens_per_s"] for answer in answered),
        "stopped_at_eot": stopped,
        "eot_share": stopped / len(answered) if answered else None,
        "mean_answer_tokens": statistics.fmean(a["answer_tokens"] for a in answered) if answered else None,
    }


# ---------------------------------------------------------------------- markdown
def _number(value, pattern: str = "{:,.2f}", suffix: str = "") -> str:
    """A figure for the report, or '–' when there is none.

    >>> _number(1234.5678), _number(None), _number(0.25, "{:.0%}"), _number(3.14159, "{:.2f}", " s")
    ('1,234.57', '–', '25%', '3.14 s')
    """
    return "–" if value is None else pattern.format(value) + suffix


def table_cell(text: str) -> str:
    """Text that stays inside one cell of a Markdown table: HTML escaped, '|' escaped, line breaks as <br>.

    >>> table_cell("a | b\\n<b>bold</b>\\n\\n")
    'a \\\\| b<br>&lt;b&gt;bold&lt;/b&gt;'
    """
    text = "".join(character for character in text if character in "\n\t" or character.isprintable())
    text = html.escape(text.strip(), quote=False).replace("|", "\\|")
    return "<br>".join(text.splitlines())


def _size(size: int | None) -> str:
    """
    >>> _size(812_345_678), _size(5_000_000), _size(None)
    ('0.81 GB', '5.0 MB', '–')
    """
    if size is None:
        return "–"
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def _answer_stats(answer: Mapping) -> str:
    if answer.get("error"):
        return f"error: {answer['error']}"
    stop = "stopped at eot" if answer["finish_reason"] == "stop" else f"cut at the limit ({answer['finish_reason']})"
    return (f"{answer['answer_tokens']} tokens · {stop} · TTFT {_number(answer['ttft_s'], '{:.2f}', ' s')} · "
            f"{_number(answer['tokens_per_s'], '{:.1f}', ' tok/s')}")


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

    row("Held-out perplexity", (_number(m["heldout"]["perplexity"]) for m in models))
    row("Conversations / assistant tokens scored",
        (f"{m['heldout']['conversations']} / {m['heldout']['scored_tokens']:,}"
         + (f" ({m['heldout']['truncated']} cut at n_ctx)" if m["heldout"]["truncated"] else "") for m in models))
    row("Time to first token, median", (_number(m["generation"]["ttft_median_s"], "{:.2f}", " s") for m in models))
    row("Tokens/s, median", (_number(m["generation"]["tokens_per_s_median"], "{:.1f}") for m in models))
    row("Answers stopped at eot",
        (f"{_number(m['generation']['eot_share'], '{:.0%}')} ({m['generation']['stopped_at_eot']}/"
         f"{m['generation']['answers'] - m['generation']['errors']})" for m in models))
    row("Mean answer length", (_number(m["generation"]["mean_answer_tokens"], "{:.0f}", " tokens") for m in models))
    row("Errors", (str(m["generation"]["errors"]) for m in models))
    row("GGUF size", (_size(m["size_bytes"]) for m in models))
    row("Load time", (_number(m["load_s"], "{:.1f}", " s") for m in models))
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
        lines.append("| " + " | ".join(f"*{table_cell(_answer_stats(a))}*" for a in answers) + " |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Prompt:
    """One prompt of the fixed set: the message, and optionally a system prompt and earlier turns."""

    id: str
    prompt: str
    category: str = ""
    system: str = ""
    history: tuple[dict, ...] = ()

    def as_dict(self) -> dict:
        return {"id": self.id, "category": self.category, "system": self.system, "history": list(self.history),
                "prompt": self.prompt}


PROMPT_KEYS = ("id", "category", "prompt", "system", "history")
PROMPT_EXAMPLE = '{"id": "explain-1", "prompt": "Explain ...", "system": "(optional)", "history": [(optional turns)]}'


def _prompt_problem(entry) -> str | None:
    """What is wrong with one decoded line of a prompts file (None when it is fine)."""
    if not isinstance(entry, dict):
        return f"expected a JSON object, got {type(entry).__name__}"
    unknown = sorted(set(entry) - set(PROMPT_KEYS))
    if unknown:
        return f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(PROMPT_KEYS)}"
    for key in ("id", "category", "prompt", "system"):
        if key in entry and not isinstance(entry[key], str):
            return f"'{key}' must be a string"
    if not entry.get("id", "").strip():
        return "needs a non-empty 'id'"
    if not entry.get("prompt", "").strip():
        return "needs a non-empty 'prompt'"
    if len(entry["prompt"]) > MAX_PROMPT_CHARS:
        return f"'prompt' is {len(entry['prompt']):,} characters, over the Space's limit of {MAX_PROMPT_CHARS:,}"
    history = entry.get("history", [])
    if not isinstance(history, list):
        return "'history' must be a list of {\"role\", \"content\"} turns"
    for index, turn in enumerate(history):
        expected = ("user", "assistant")[index % 2]
        if not isinstance(turn, dict) or turn.get("role") != expected or not isinstance(turn.get("content"), str) \
                or not turn["content"].strip():
            return f"history turn {index} must be {{\"role\": \"{expected}\", \"content\": non-empty text}}"
    if len(history) % 2:
        return "'history' must end with an assistant turn (the prompt is the next user turn)"
    return None


def load_prompts(path: Path) -> list[Prompt]:
    """The prompts of a JSON Lines file; ValueError naming up to three bad lines (and how many more) otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read it ({type(error).__name__}: {error})") from error
    prompts, problems, seen = [], [], set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"line {number}: not valid JSON ({error.msg} at column {error.colno})")
            continue
        problem = _prompt_problem(entry)
        if problem is None and entry["id"] in seen:
            problem = f"id {entry['id']!r} is used twice"
        if problem:
            problems.append(f"line {number}: {problem}")
            continue
        seen.add(entry["id"])
        prompts.append(Prompt(id=entry["id"], prompt=entry["prompt"].strip(), category=entry.get("category", ""),
                              system=entry.get("system", "").strip(), history=tuple(entry.get("history", []))))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError("; ".join(problems[:3]) + more + f"; each line must be a JSON object like {PROMPT_EXAMPLE}")
    if not prompts:
        raise ValueError(f"has no prompts; give one JSON object per line like {PROMPT_EXAMPLE}")
    return prompts


@dataclass
class HeldOut:
    conversations: list[list[dict]]
    description: str
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (row number, reason) of rows left out


def eval_split(config: Mapping, origin: str) -> HeldOut:
    """The eval split a training run with this config held out: train/data.py's own prepare() with its dataset,
    split, seed, eval_samples and min_score, so it is by construction what that run never trained on."""
    try:
        dataset, seed, count = config["dataset"], config["seed"], config["eval_samples"]
        split, min_score = config.get("dataset_split", "train"), config.get("min_score")
    except (KeyError, TypeError) as error:
        raise ValueError(f"{origin} does not record the training config ({error}); give a .jsonl file instead") \
            from error
    if not count:
        raise ValueError(f"{origin} held out no conversations (eval_samples 0); give a .jsonl file instead")
    prepared = prepare(read_rows(dataset, split), seed=seed, eval_samples=count, min_score=min_score)
    return HeldOut(prepared.eval, f"the eval split of {origin}: {len(prepared.eval)} of {prepared.total_rows} rows "
                                  f"of `{dataset}`, seed {seed}")


def load_heldout(value: str | None) -> HeldOut:
    """Held-out conversations: the tiny preset's eval split (None), a training run's folder (its run.json), or a
    FineTome-format .jsonl/.json/.parquet file read and standardised as training reads it (all rows, bad ones
    left out). ValueError or train.data.DataError with a one-line reason otherwise."""
    if value is None:
        config = TrainConfig(**load_preset(DEFAULT_HELDOUT_PRESET)).to_dict()
        heldout = eval_split(config, f"the {DEFAULT_HELDOUT_PRESET} preset")
        heldout.description += (" (conversations written for this project: never trained on by a tiny run, and "
                                "never seen by models trained on FineTome-100k)")
        return heldout
    path = resolve_local_path(value)
    if path.is_dir():
        run_file = path / "run.json"
        if not run_file.is_file():
            raise ValueError("is a folder without run.json; give a training run's output folder or a .jsonl file")
        try:
            run = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read {run_file} ({error})") from error
        return eval_split(run.get("config") if isinstance(run, dict) else None, f"the training run {value}")
    if path.suffix.lower() not in (".jsonl", ".json", ".parquet"):
        raise ValueError("expected a FineTome-format .jsonl (or .json/.parquet) file or a training run's folder")
    conversations, skipped, total = [], [], 0
    for number, row in read_rows(path):
        total += 1
        try:
            conversations.append(standardize_row(row))
        except BadRow as error:
            skipped.append((number, str(error)))
    if not conversations:
        first = f" (row {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise DataError(f"no usable conversation in {total} rows{first}")
    return HeldOut(conversations, f"`{value}` ({len(conversations)} of {total} rows)", skipped)


def gguf_problem(path: Path) -> str | None:
    """Why a local path is not a GGUF model file (None when it looks like one)."""
    if not path.exists():
        return "no such file; give a .gguf file (export/to_gguf.py writes them) or a Hub repo USER/NAME"
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        hint = f", e.g. {found[0]}" if found else ""
        return f"is a folder; give the .gguf file in it{hint}"
    try:
        with path.open("rb") as file:
            magic = file.read(4)
    except OSError as error:
        return f"cannot read it ({error.strerror or error})"
    if magic != GGUF_MAGIC:
        return "not a GGUF file (it does not start with the GGUF magic bytes); give a .gguf file export/to_gguf.py wrote"
    return None


# ---------------------------------------------------------------------- command line
@dataclass
class CompareConfig:
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
    parser = UsageParser(prog="python scripts/compare.py", description=__doc__.splitlines()[0])
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

    models: list[ModelSpec] = []
    if not args.model:
        problems.append("--model: give at least one model, e.g. --model 1B=USER/Llama-3.2-1B-Instruct-FineTome-GGUF "
                        "or --model tiny=exports/tiny/X-Q4_K_M.gguf")
    for text in args.model:
        try:
            spec = parse_model_argument(text)
        except ValueError as error:
            problems.append(f"--model {text!r}: {error}")
            continue
        if spec.repo_id:
            try:
                validate_repo_id(spec.repo_id, "--model")
            except ExportError as error:
                problems.append(f"--model {text!r}: {str(error).split(': ', 1)[-1]}")
                continue
        else:
            problem = gguf_problem(Path(spec.path).expanduser())
            if problem:
                problems.append(f"--model {text!r}: {problem}")
                continue
            spec = replace(spec, path=str(Path(spec.path).expanduser()))
        models.append(spec)
    labels = [text.partition("=")[0].strip() for text in args.model]
    for label in sorted({label for label in labels if label and labels.count(label) > 1}):
        problems.append(f"--model: the label {label!r} is given {labels.count(label)} times; give each model its own "
                        "label")

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


# ---------------------------------------------------------------------- measuring (llama.cpp)
class GgufChatTemplate:
    """A GGUF's chat template, rendered by the Space's own formatter, behind the one tokenizer method train/data.py
    calls (apply_chat_template), so that training's assistant_spans() finds the answers in the text scored here."""

    def __init__(self, formatter):
        self._formatters = {}
        for flag in (False, True):
            self._formatters[flag] = copy.copy(formatter)
            self._formatters[flag].add_generation_prompt = flag

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = False,
                            date_string: str | None = None) -> str:
        if tokenize:
            raise NotImplementedError("only text rendering is offered")
        extra = {"date_string": date_string} if date_string else {}
        return self._formatters[bool(add_generation_prompt)](messages=messages, **extra).prompt


def conversation_tokens(llm, template: GgufChatTemplate, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """The GGUF's tokens of a conversation rendered as training renders it (the template's fixed date), and which
    of them training puts loss on."""
    text, spans = assistant_spans(template, messages)
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)  # the template writes the BOS itself
    pieces = [llm.detokenize([token], special=True) for token in tokens]
    return tokens, assistant_token_mask(pieces, text, spans)


def score_heldout(engine: Engine, label: str, conversations: list[list[dict]], n_ctx: int,
                  progress: Callable[[str], None] = log) -> dict:
    """Per-conversation negative log-likelihood of the assistant tokens from the GGUF's own logits."""
    llm = engine.get(label)
    template = GgufChatTemplate(engine.chat_formatter(label))
    encoded = [conversation_tokens(llm, template, messages) for messages in conversations]
    longest = min(max(len(tokens) for tokens, _ in encoded), n_ctx)
    progress(f"[{label}] scoring {len(encoded)} held-out conversations (longest {longest} tokens: "
             f"{longest * llm.n_vocab() * 4 / 1e9:.2f} GB of logits)")
    # A second Llama over the same (memory-mapped) file: logits_all keeps every position's logits, which the
    # Space's instance does not; its context only needs the longest conversation.
    scorer = open_gguf(llm.model_path, n_ctx=longest, n_batch=min(512, longest), logits_all=True,
                       n_threads=engine.n_threads)
    started, per_conversation, total_nll, total_scored = time.perf_counter(), [], 0.0, 0
    try:
        for index, (tokens, mask) in enumerate(encoded):
            truncated = len(tokens) > n_ctx
            tokens, mask = tokens[:n_ctx], mask[:n_ctx]
            positions = [position for position in range(1, len(tokens)) if mask[position]]
            nll = 0.0
            if positions:
                scorer.reset()
                scorer.eval(tokens)
                for start in range(0, len(positions), LOGIT_ROWS_PER_CHUNK):
                    chunk = positions[start:start + LOGIT_ROWS_PER_CHUNK]
                    # The logits at position p - 1 predict the token at p.
                    rows = scorer.scores[[position - 1 for position in chunk]]
                    nll -= float(token_log_probs(rows, [tokens[position] for position in chunk]).sum())
            total_nll, total_scored = total_nll + nll, total_scored + len(positions)
            first_user = next((m["content"] for m in conversations[index] if m["role"] == "user"), "")
            per_conversation.append({
                "index": index, "first_user_message": " ".join(first_user.split())[:80], "tokens": len(tokens),
                "scored_tokens": len(positions), "truncated": truncated, "negative_log_likelihood": nll,
                "perplexity": perplexity(nll, len(positions))})
            if len(encoded) <= 20 or (index + 1) % max(1, len(encoded) // 10) == 0 or index + 1 == len(encoded):
                progress(f"[{label}]   {index + 1}/{len(encoded)} conversations, perplexity so far "
                         f"{_number(perplexity(total_nll, total_scored))}")
    finally:
        scorer.close()
    return {"perplexity": perplexity(total_nll, total_scored), "conversations": len(per_conversation),
            "tokens": sum(c["tokens"] for c in per_conversation), "scored_tokens": total_scored,
            "truncated": sum(c["truncated"] for c in per_conversation), "negative_log_likelihood": total_nll,
            "seconds": round(time.perf_counter() - started, 2), "per_conversation": per_conversation}


class TokenClock:
    """When each token of an answer is sampled: wraps one Llama's generate(), which create_chat_completion runs.

    The Space's own figures count streamed text pieces, and llama-cpp-python holds back bytes that are not yet
    valid UTF-8 (a character split over tokens; a random-weight model's answers are full of them), so a piece can
    stand for several tokens. Timing the tokens themselves gives exact counts and rates for any model.
    """

    def __init__(self, llm):
        self.times: list[float] = []
        original = llm.generate

        def generate(*args, **kwargs):
            inner = original(*args, **kwargs)
            try:
                for token in inner:
                    self.times.append(time.perf_counter())
                    yield token
            finally:
                inner.close()

        llm.generate = generate  # this instance only; Llama._create_completion calls self.generate


def answer_figures(requested_at: float, token_times: Sequence[float], finish_reason: str | None) -> dict:
    """Time to first token, tokens/s after it, and answer length, from when each token was sampled.

    An answer that stops at <|eot_id|> samples that token last: it counts for the rate (a decoding step like the
    others) but not for the length.

    >>> answer_figures(10.0, [10.5, 10.6, 10.7, 10.8], "stop")
    {'ttft_s': 0.5, 'tokens_per_s': 10.0, 'answer_tokens': 3}
    >>> answer_figures(10.0, [], "error")
    {'ttft_s': None, 'tokens_per_s': None, 'answer_tokens': 0}
    """
    sampled = len(token_times)
    rate = None
    if sampled >= 2 and token_times[-1] > token_times[0]:
        rate = round((sampled - 1) / (token_times[-1] - token_times[0]), 6)
    return {"ttft_s": round(token_times[0] - requested_at, 6) if sampled else None, "tokens_per_s": rate,
            "answer_tokens": max(0, sampled - (finish_reason == "stop"))}


def generate_answers(engine: Engine, label: str, prompts: list[Prompt], sampling: Sampling,
                     progress: Callable[[str], None] = log) -> dict:
    """Each prompt's answer through the Space's own streaming path (Engine.stream_chat), with its timing and stop
    reason; the Space's own streamed figures are kept beside the exact ones."""
    clock = TokenClock(engine.get(label))
    started, answers = time.perf_counter(), []
    for number, prompt in enumerate(prompts, 1):
        clock.times.clear()
        reply, requested_at = None, time.perf_counter()
        for reply in engine.stream_chat(label, prompt.prompt, list(prompt.history), prompt.system, sampling):
            pass
        finish_reason = reply.finish_reason if reply else "error"
        answer = {"id": prompt.id, "text": reply.text if reply else "", "finish_reason": finish_reason,
                  "error": reply.error if reply else "no reply",
                  **answer_figures(requested_at, clock.times, finish_reason),
                  "space_ttft_s": reply.ttft_s if reply else None,
                  "space_tokens_per_s": reply.tokens_per_s if reply else None,
                  "streamed_pieces": reply.tokens if reply else 0}
        answers.append(answer)
        progress(f"[{label}]   prompt {number}/{len(prompts)} {prompt.id}: {_answer_stats(answer)}")
    return {**summarize_answers(answers), "seconds": round(time.perf_counter() - started, 2), "per_prompt": answers}


def machine_info() -> dict:
    """The CPU's name and core counts, and llama.cpp's path on it, for the report's header."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "usable_cores": usable_cpus(),
            "llama_cpp": extra_buffers().describe(), "system": f"{platform.system()} {platform.release()}",
            "load_average": round(os.getloadavg()[0], 2)}  # 1 minute: others busy on these cores slow the timings


# ---------------------------------------------------------------------- writing
def write_chart(report: Mapping, path: Path) -> None:
    import matplotlib

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
        ("GGUF size (MB)", [m["size_bytes"] / 1e6 for m in models], "{:,.0f}"),
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


# ---------------------------------------------------------------------- main
def load_models(engine: Engine, specs: list[ModelSpec]) -> dict[str, float]:
    """Load (and for Hub repos first download) every model before any measuring, so that a model that cannot be had
    fails the run in seconds rather than after the others were measured. Returns each model's load time.
    Failures become one-line ExportErrors naming the --model argument and the fix."""
    load_s = {}
    for spec in specs:
        log(f"[{spec.label}] loading {describe_source(spec)}" + (" (downloading it if needed)" if spec.repo_id else ""))
        started = time.perf_counter()
        where = f"--model {spec.label}={describe_source(spec)}"
        try:
            if spec.repo_id:
                with hub_errors(f"{where}: downloading from the Hub", None, retry="run the command again", fixes={
                        401: "the repo is private or gated: set HF_TOKEN or run `hf auth login`",
                        404: "no such repo (or it is private): check the id, or give a local .gguf path"}):
                    try:
                        engine.get(spec.label)
                    except ValueError as error:  # Llama.from_pretrained: no file, or several, match the glob
                        raise ExportError(f"{where}: {first_line(error)}; give a glob that matches one GGUF file, "
                                          f"e.g. {spec.repo_id}:{DEFAULT_GLOB}") from error
            else:
                engine.get(spec.label)
        except ExportError:
            raise
        except Exception as error:  # llama.cpp could not load the file, the template is missing, ...
            raise ExportError(f"{where}: could not load it ({first_line(error)}); re-export it with "
                              "export/to_gguf.py") from error
        load_s[spec.label] = round(time.perf_counter() - started, 2)
    return load_s


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
        llm = engine.get(spec.label)
        scored = score_heldout(engine, spec.label, heldout.conversations, config.n_ctx)
        log(f"[{spec.label}] held-out perplexity {_number(scored['perplexity'])} over {scored['scored_tokens']:,} "
            f"assistant tokens ({scored['seconds']:.1f} s); answering {len(config.prompts)} prompts")
        generation = generate_answers(engine, spec.label, config.prompts, config.sampling)
        models.append({"label": spec.label, "source": describe_source(spec), "path": llm.model_path,
                       "size_bytes": Path(llm.model_path).stat().st_size, "load_s": load_s[spec.label],
                       "n_vocab": llm.n_vocab(), "heldout": scored, "generation": generation})
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


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = config_from_args(argv)
    except UsageError as error:
        return error.report()
    try:
        report = run(config)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    files = write_report(config.out, report)
    for model in report["models"]:
        log(f"[{model['label']}] perplexity {_number(model['heldout']['perplexity'])}, TTFT median "
            f"{_number(model['generation']['ttft_median_s'], '{:.2f}', ' s')}, "
            f"{_number(model['generation']['tokens_per_s_median'], '{:.1f}')} tok/s, "
            f"{_number(model['generation']['eot_share'], '{:.0%}')} stopped at eot")
    log(f"compare: done in {report['wall_s']:.0f} s; wrote:")
    for path in files:
        log(f"  {path}  ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
