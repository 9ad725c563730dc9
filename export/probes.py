"""Behaviour probes: does each GGUF answer as the merged model does? Greedy answers to a few prompts, token by token.

    from export.probes import probe_set, merged_answers, gguf_answers, compare_answers
    probes = probe_set(run_info)   # the taught questions for the demo preset, else held-out prompts

The merged 16-bit model (transformers, the tokenizer's chat template) and every GGUF (llama.cpp, the GGUF's own
template, rendered with the same date) answer each prompt greedily, for at most `max_tokens` tokens. A probe
agrees when the two token sequences are identical up to that limit (or up to <|eot_id|>, when both stop sooner).
For a taught run (`train/data/taught.jsonl`, the demo preset) each answer is also compared with the answer it was
taught, and that is a check; for any other run the figures are reported, not checked.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

from common.llama_runtime import gguf_chat_formatter, open_gguf
from common.llama3 import END_OF_MESSAGE_ID, END_OF_TEXT_ID, EOT_ID, TEMPLATE_DATE
from train.summary import RunSummary

STOP_IDS = (EOT_ID, END_OF_TEXT_ID, END_OF_MESSAGE_ID)
TAUGHT_DATASET = Path(__file__).resolve().parents[1] / "train" / "data" / "taught.jsonl"

# Held-out prompts for a real (1B/3B) export, FineTome-like, written for this check: no training set holds them.
HELDOUT_PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Write a Python function that returns the factorial of n.",
    "What is the difference between weather and climate?",
    "Give three tips for writing a clear email.",
    "A train travels 120 km in 1.5 hours. What is its average speed?",
    "Summarize the water cycle for a ten-year-old.",
    "What does a compiler do?",
    "Name two causes of the French Revolution.",
]

# The share of taught answers each GGUF must reproduce word for word is its type's `taught_min_share`
# (export/gguf.py's QUANT_TYPES): every exported type has one, none is only reported.


@dataclass
class Probe:
    prompt: str
    expected: str | None = None  # the taught answer, when the run was taught it


def read_taught(path: Path) -> list[Probe]:
    """First human turn -> first gpt turn of each row of a FineTome-schema .jsonl."""
    probes = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        turns = json.loads(line)["conversations"]
        human = next(t["value"] for t in turns if t["from"] == "human")
        answer = next((t["value"] for t in turns if t["from"] == "gpt"), None)
        probes.append(Probe(human, answer))
    return probes


def taught_file(run_info: RunSummary | None) -> Path | None:
    """The taught set when the training run read it (the demo preset), else None."""
    dataset = str((run_info.dataset if run_info is not None else None) or "")
    if not dataset:
        return None
    from train.config import resolve_local_path

    path = resolve_local_path(dataset)
    return path if path.is_file() and path.resolve() == TAUGHT_DATASET else None


def probe_set(run_info: RunSummary | None, count: int) -> tuple[str, list[Probe]]:
    """("taught", the taught questions) for a run trained on the taught set, else ("held-out", `count` prompts)."""
    taught = taught_file(run_info)
    if taught is not None:
        return "taught", read_taught(taught)[:count]
    return "held-out", [Probe(p) for p in HELDOUT_PROMPTS[:count]]


def _messages(probe: Probe) -> list[dict]:
    return [{"role": "user", "content": probe.prompt}]


def _until_stop(ids: list[int]) -> list[int]:
    """Answer tokens up to and including the first end-of-generation token."""
    for i, token in enumerate(ids):
        if token in STOP_IDS:
            return ids[: i + 1]
    return ids


def merged_answers(model, tokenizer, probes: list[Probe], max_tokens: int) -> list[list[int]]:
    """Greedy answer token ids of an already loaded transformers model (the caller loads and frees it)."""
    import torch

    answers = []
    with torch.inference_mode():
        for probe in probes:
            ids = tokenizer.apply_chat_template(_messages(probe), add_generation_prompt=True, tokenize=False,
                                                date_string=TEMPLATE_DATE)
            inputs = tokenizer(ids, add_special_tokens=False, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, eos_token_id=list(STOP_IDS),
                                 pad_token_id=tokenizer.pad_token_id)
            answers.append(_until_stop(out[0, inputs["input_ids"].shape[1]:].tolist()))
    return answers


def gguf_answers(path: Path, probes: list[Probe], max_tokens: int) -> list[list[int]]:
    """Greedy answer token ids from a GGUF, its prompt rendered by its own chat template with the training date."""
    llm = open_gguf(path, n_ctx=512, n_batch=512)
    formatter = gguf_chat_formatter(llm)
    answers = []
    for probe in probes:
        prompt = formatter(messages=_messages(probe), date_string=TEMPLATE_DATE).prompt if formatter else probe.prompt
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        llm.reset()
        answer = []
        for token in llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            answer.append(int(token))
            if token in STOP_IDS or len(answer) >= max_tokens:
                break
        answers.append(answer)
    del llm
    gc.collect()
    return answers


def answer_text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def first_divergence(reference: list[int], candidate: list[int]) -> int | None:
    """Index of the first answer token that differs (None when identical).

    >>> first_divergence([1, 2, 3], [1, 2, 3]), first_divergence([1, 2, 3], [1, 5, 3]), first_divergence([1], [1, 2])
    (None, 1, 1)
    """
    for i, (a, b) in enumerate(zip(reference, candidate)):
        if a != b:
            return i
    return None if len(reference) == len(candidate) else min(len(reference), len(candidate))


def compare_answers(tokenizer, probes: list[Probe], reference: list[list[int]], candidate: list[list[int]]) -> dict:
    """Identical share against the merged model, the first divergence, and (taught runs) taught answers matched."""
    identical, divergence = 0, None
    for probe, ref, cand in zip(probes, reference, candidate):
        at = first_divergence(ref, cand)
        if at is None:
            identical += 1
        elif divergence is None:
            divergence = {"prompt": probe.prompt, "token": at, "merged": tokenizer.decode(ref[at:at + 1]),
                          "gguf": tokenizer.decode(cand[at:at + 1]), "context": answer_text(tokenizer, ref[:at])}
    out = {"identical": identical, "probes": len(probes), "share": identical / len(probes) if probes else None,
           "first_divergence": divergence}
    if probes and all(p.expected is not None for p in probes):
        out["taught"] = sum(answer_text(tokenizer, c) == p.expected for p, c in zip(probes, candidate))
    return out


def answers_table(tokenizer, probes: list[Probe], answers: dict[str, list[list[int]]]) -> list[dict]:
    """Every probe with each model's answer as text (report.json)."""
    return [{"prompt": p.prompt, "expected": p.expected,
             **{name: answer_text(tokenizer, ids[i]) for name, ids in answers.items()}}
            for i, p in enumerate(probes)]
