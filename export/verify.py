"""Prove a GGUF is the trained model: metadata, tokenizer, chat template, logits, quantization error, a chat.

Each check returns a `Check` (name, passed, value, threshold, detail); the export fails when one fails. Nothing
here loads the Hugging Face model in fp32: it is read in fp16 (the merged weights' own dtype), so verifying a 3B
export fits in Colab's RAM, and it is freed before llama.cpp loads the GGUF.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.llama_runtime import gguf_chat_formatter, open_gguf
from common.llama3 import EOT_ID, TEMPLATE_DATE

from .gguf import ftype_value, quant_type

# Tokenizer parity: varied text where tokenizers usually disagree.
TOKENIZER_TEXTS = [
    "Hello world! A plain sentence, with punctuation; and more.",
    "Accents: café, naïve, résumé, Ångström, São Paulo, Dvořák, ça va ?",
    "中文：机器学习是人工智能的一个分支。日本語のテキストです。한국어 문장.",
    "Emoji 🎉🚀🦙 and a family 👩‍👩‍👧‍👦, flags 🇫🇷🇯🇵.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "    four leading spaces\n\n\n\ttabs\t\tand   runs of   spaces   ",
    "Digits 1234567890 3.14159 1e-10 0x1F 2026-11-21 $1,299.99 100%",
    "Contractions: don't, I'll, we've, she'd, they're; CAPS and camelCase HTTPServer.",
    "Русский текст, ελληνικά, עברית, العربية, हिन्दी.",
    "<|start_header_id|>user<|end_header_id|>\n\nSpecial tokens in text.<|eot_id|>",
    "",
]

# Held-out text for logit parity and quantization error: written for this check, never trained on.
HELDOUT_TEXTS = [
    "The lighthouse keeper wrote in his log every evening: the wind direction, the height of the swell, and "
    "the names of the ships that passed. After forty years the logbooks filled a whole room, and historians "
    "now use them to study how storms in the North Sea changed over the twentieth century.",
    "To make a simple vinaigrette, whisk one part vinegar with three parts olive oil, then season with salt, "
    "pepper and a little mustard, which helps the oil and vinegar stay mixed. Taste it on a leaf of lettuce "
    "rather than on a spoon, because that is how it will be eaten.",
    "In Python, a generator function uses the yield keyword to produce values lazily. Calling it returns an "
    "iterator; each call to next() runs the function until the next yield, which makes generators useful for "
    "streaming large files line by line without loading them into memory.",
    "Photosynthesis converts light energy into chemical energy. In the chloroplasts, water is split, oxygen is "
    "released, and the energy captured is used to build sugars from carbon dioxide in the Calvin cycle.",
]

TEMPLATE_CONVERSATION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And its population, roughly?"},
    {"role": "assistant", "content": "About 2.1 million in the city proper."},
    {"role": "user", "content": "Thanks! One fun fact?"},
]

# Quantization error limits (mean KL divergence on held-out text) live with each type in export/gguf.py's QUANT_TYPES.
TOP1_MIN_F16 = 0.99  # the f16 GGUF against the merged Hugging Face model


@dataclass
class Check:
    name: str
    passed: bool
    value: object
    threshold: str | None = None
    detail: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def load_problem(path: Path) -> str | None:
    """Why llama.cpp cannot load this file as a model (None when it can). Loading maps the file and checks every
    tensor against its size, so a truncated GGUF is caught; nothing is read into memory or computed."""
    try:
        llm = open_gguf(path, n_ctx=32, n_batch=32)
    except ValueError as error:  # llama-cpp-python: "Failed to load model from file: …"
        return str(error).strip() or type(error).__name__
    llm.close()
    return None


# ---------------------------------------------------------------------- metadata, tokenizer, template
def check_metadata(path: Path, quant: str, hf_tokenizer) -> list[Check]:
    llm = open_gguf(path, vocab_only=True)
    meta = llm.metadata
    eot = hf_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    checks = [
        Check("architecture", meta.get("general.architecture") == "llama", meta.get("general.architecture"), "llama"),
        Check("pre-tokenizer", meta.get("tokenizer.ggml.pre") == "llama-bpe", meta.get("tokenizer.ggml.pre"),
              "llama-bpe"),
        Check("eos token", meta.get("tokenizer.ggml.eos_token_id") == str(eot) == str(EOT_ID),
              meta.get("tokenizer.ggml.eos_token_id"), f"{EOT_ID} (<|eot_id|>)"),
        Check("chat template", meta.get("tokenizer.chat_template", "") == hf_tokenizer.chat_template,
              "present" if meta.get("tokenizer.chat_template") else "missing", "equal to the tokenizer's"),
        Check("file type", meta.get("general.file_type") == str(ftype_value(quant)), meta.get("general.file_type"),
              f"{ftype_value(quant)} ({quant})"),
    ]
    for check in checks:
        check.name = f"{path.name}: {check.name}"
    return checks


def imatrix_of(path: Path) -> str | None:
    """The file name of the importance matrix llama-quantize recorded in a GGUF (None: quantized without one)."""
    recorded = open_gguf(path, vocab_only=True).metadata.get("quantize.imatrix.file")
    return Path(recorded).name if recorded else None


def check_imatrix_recorded(path: Path, imatrix: Path) -> Check:
    meta = open_gguf(path, vocab_only=True).metadata
    recorded = meta.get("quantize.imatrix.file")
    return Check(f"{path.name}: importance matrix", recorded is not None and Path(recorded).name == imatrix.name,
                 Path(recorded).name if recorded else "none", imatrix.name,
                 f"{meta.get('quantize.imatrix.entries_count', '?')} tensors, "
                 f"{meta.get('quantize.imatrix.chunks_count', '?')} chunks, as llama-quantize recorded it")


def check_tokenizer(path: Path, hf_tokenizer) -> Check:
    llm = open_gguf(path, vocab_only=True)
    mismatches = []
    for text in TOKENIZER_TEXTS:
        ours = llm.tokenize(text.encode(), add_bos=True, special=True)
        theirs = hf_tokenizer(text)["input_ids"]
        if ours != theirs:
            mismatches.append(text[:30])
    agreement = 1 - len(mismatches) / len(TOKENIZER_TEXTS)
    return Check("tokenizer parity (llama.cpp vs Hugging Face)", not mismatches, f"{agreement:.0%}",
                 "100% of texts", f"differs on: {mismatches}" if mismatches else f"{len(TOKENIZER_TEXTS)} texts")


def gguf_chat_prompt(path: Path, messages: list[dict], **template_kwargs) -> str:
    """The prompt llama-cpp-python renders for a chat, built from the GGUF as `Llama` builds its handler."""
    formatter = gguf_chat_formatter(open_gguf(path, vocab_only=True))
    if formatter is None:
        return ""  # no template in the GGUF: check_template reports the mismatch
    return formatter(messages=messages, **template_kwargs).prompt


def check_template(path: Path, hf_tokenizer) -> Check:
    ours = gguf_chat_prompt(path, TEMPLATE_CONVERSATION, date_string=TEMPLATE_DATE)
    theirs = hf_tokenizer.apply_chat_template(TEMPLATE_CONVERSATION, tokenize=False, add_generation_prompt=True,
                                              date_string=TEMPLATE_DATE)
    detail = "3-turn conversation with a system message"
    if ours != theirs:
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        detail = f"first difference at character {at}: {ours[at:at + 30]!r} vs {theirs[at:at + 30]!r}"
    return Check("chat-template parity (llama-cpp-python vs apply_chat_template)", ours == theirs,
                 "equal" if ours == theirs else "different", "equal", detail)


# ---------------------------------------------------------------------- logits
def heldout_token_ids(hf_tokenizer) -> list[list[int]]:
    return [hf_tokenizer(text)["input_ids"] for text in HELDOUT_TEXTS]


def load_merged(merged_dir: Path):
    """The merged model in its own fp16 (never fp32: a 3B fits Colab's RAM); the caller frees it."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float16).eval()


def model_logits(model, sequences: list[list[int]]) -> list[np.ndarray]:
    import torch

    with torch.inference_mode():
        return [model(torch.tensor([ids])).logits[0].float().numpy() for ids in sequences]


def gguf_logits(path: Path, sequences: list[list[int]]) -> list[np.ndarray]:
    longest = max(len(ids) for ids in sequences)
    llm = open_gguf(path, n_ctx=max(64, longest + 8), logits_all=True, n_batch=max(64, longest + 8))
    out = []
    for ids in sequences:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    del llm
    gc.collect()
    return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# Two logits closer than this are a tie as far as fp16 arithmetic can tell (fp16 resolves ~0.002 near 2.0).
TIE_TOLERANCE = 0.01


def position_figures(reference: list[np.ndarray], candidate: list[np.ndarray],
                     targets: list[list[int]] | None = None) -> dict[str, np.ndarray]:
    """Per position: KL(reference || candidate), whether the top-1 choices agree (exactly; within TIE_TOLERANCE),
    |difference| at its largest, and with `targets` (the token that follows each position) both negative
    log-likelihoods. Long runs can be measured piece by piece and the pieces concatenated before summarize()."""
    reference_all, candidate_all = np.concatenate(reference), np.concatenate(candidate)
    log_p, log_q = _log_softmax(reference_all.astype(np.float64)), _log_softmax(candidate_all.astype(np.float64))
    reference_top, candidate_top = reference_all.argmax(-1), candidate_all.argmax(-1)
    rows = np.arange(len(reference_top))
    margin = reference_all[rows, reference_top] - reference_all[rows, candidate_top]
    figures = {"kld": (np.exp(log_p) * (log_p - log_q)).sum(axis=-1),
               "top1": reference_top == candidate_top,
               "top1_ties": margin <= TIE_TOLERANCE,
               "abs_diff": np.abs(reference_all - candidate_all).max(axis=-1)}
    if targets is not None:
        next_ids = np.concatenate([np.asarray(ids) for ids in targets])
        figures["nll_reference"], figures["nll"] = -log_p[rows, next_ids], -log_q[rows, next_ids]
    return figures


def summarize(figures: dict[str, np.ndarray]) -> dict:
    stats = {
        "positions": int(len(figures["kld"])),
        "max_abs_diff": float(figures["abs_diff"].max()),
        "top1_agreement": float(figures["top1"].mean()),
        "top1_agreement_ties": float(figures["top1_ties"].mean()),
        "kld_mean": float(figures["kld"].mean()),
        "kld_p99": float(np.percentile(figures["kld"], 99)),
        "kld_max": float(figures["kld"].max()),
    }
    if "nll" in figures:  # perplexity of both, as llama-perplexity reports it
        stats["perplexity_reference"] = float(np.exp(figures["nll_reference"].mean()))
        stats["perplexity"] = float(np.exp(figures["nll"].mean()))
    return stats


def compare_logits(reference: list[np.ndarray], candidate: list[np.ndarray],
                   targets: list[list[int]] | None = None) -> dict:
    """Max |difference|, top-1 agreement, mean, 99th-percentile and largest KL(reference || candidate) over every
    position; with `targets` (the token that follows each position), both perplexities.

    `top1_agreement_ties` also counts a position as agreeing when the candidate's choice is tied with the
    reference's best within TIE_TOLERANCE: near-uniform distributions (a random model) have such near-ties,
    and which side of one the rounding lands on says nothing about the conversion.
    """
    return summarize(position_figures(reference, candidate, targets))


def check_f16_logits(stats: dict) -> Check:
    kld_limit = quant_type("f16").kld_limit
    return Check("logit parity: f16 GGUF vs merged model (fp16)",
                 stats["top1_agreement_ties"] >= TOP1_MIN_F16 and stats["kld_mean"] <= kld_limit,
                 f"top-1 {stats['top1_agreement_ties']:.2%} (exact {stats['top1_agreement']:.2%}), "
                 f"max |diff| {stats['max_abs_diff']:.4f}, mean KLD {stats['kld_mean']:.6f}",
                 f"top-1 >= {TOP1_MIN_F16:.0%}, ties within {TIE_TOLERANCE} counted as agreeing; "
                 f"mean KLD <= {kld_limit}",
                 f"{stats['positions']} held-out positions")


def check_quant_logits(file_name: str, quant: str, stats: dict) -> Check:
    """The file's mean KLD from the f16 GGUF against its type's own limit (export/gguf.py); every type has one."""
    kld_limit = quant_type(quant).kld_limit
    return Check(f"quantization error: {file_name} vs f16 GGUF", stats["kld_mean"] <= kld_limit,
                 f"mean KLD {stats['kld_mean']:.5f}, top-1 {stats['top1_agreement']:.2%}",
                 f"mean KLD <= {kld_limit}",
                 f"{stats['positions']} held-out positions; 99th-percentile KLD {stats['kld_p99']:.4f}, "
                 f"max {stats['kld_max']:.4f}")


# ---------------------------------------------------------------------- a real chat
def check_chat(path: Path) -> Check:
    llm = open_gguf(path, n_ctx=512)
    response = llm.create_chat_completion(
        messages=[{"role": "user", "content": "Say hello in one short sentence."}],
        max_tokens=24, temperature=0.0, seed=0)
    text = response["choices"][0]["message"]["content"] or ""
    reason = response["choices"][0]["finish_reason"]
    return Check(f"{path.name}: chat completion through llama-cpp-python", bool(text.strip()),
                 f"{len(text)} characters, finish_reason {reason}", "non-empty text", repr(text[:80]))
