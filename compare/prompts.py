"""The prompts every model answers (the shipped set, scripts/compare_prompts.jsonl, or the user's), the answers
through the Space's own streaming path, and their figures: time to first token, tokens/s, stopping at <|eot_id|>,
length.

    prompts = load_prompts(DEFAULT_PROMPTS)
    generated = generate_answers(engine, "1B", prompts, Sampling(max_new_tokens=64))
    generated["eot_share"], generated["per_prompt"][0]["text"]
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.log import stage_logger
from space.engine import MAX_MESSAGE_CHARS, Engine
from space.replies import Sampling

from .report import describe_answer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PROMPTS = REPO / "scripts" / "compare_prompts.jsonl"  # beside the entry script, where the README names it

log = stage_logger("compare").info


# ---------------------------------------------------------------------- the prompts
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
    if len(entry["prompt"]) > MAX_MESSAGE_CHARS:
        return f"'prompt' is {len(entry['prompt']):,} characters, over the Space's limit of {MAX_MESSAGE_CHARS:,}"
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


# ---------------------------------------------------------------------- the answers' figures
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
    {'answers': 3, 'errors': 1, 'ttft_median_s': 0.5, 'tokens_per_s_median': 25.0, 'stopped_at_eot': 1,
     'eot_share': 0.5, 'mean_answer_tokens': 148.0}
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


# ---------------------------------------------------------------------- answering (llama.cpp)
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
    started, answers = time.perf_counter(), []
    for number, prompt in enumerate(prompts, 1):
        reply, requested_at = None, time.perf_counter()
        for reply in engine.stream_chat(label, prompt.prompt, list(prompt.history), prompt.system, sampling):
            pass
        finish_reason = reply.finish_reason if reply else "error"
        answer = {"id": prompt.id, "text": reply.text if reply else "", "finish_reason": finish_reason,
                  "error": reply.error if reply else "no reply",
                  # a local model's Reply holds when each token was sampled; a server's, its streamed figures
                  **(answer_figures(requested_at, reply.token_times, finish_reason) if reply and reply.token_times
                     is not None else
                     {"ttft_s": reply.ttft_s, "tokens_per_s": reply.tokens_per_s,
                      "answer_tokens": reply.tokens} if reply else {}),
                  "space_ttft_s": reply.ttft_s if reply else None,
                  "space_tokens_per_s": reply.tokens_per_s if reply else None,
                  "streamed_pieces": reply.tokens if reply else 0}
        answers.append(answer)
        progress(f"[{label}]   prompt {number}/{len(prompts)} {prompt.id}: {describe_answer(answer)}")
    return {**summarize_answers(answers), "seconds": round(time.perf_counter() - started, 2), "per_prompt": answers}
