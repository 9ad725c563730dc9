"""The held-out set and its perplexity: which conversations (the tiny preset's eval split, a training run's own
eval split, or a FineTome-format file), which of their tokens count (exactly those training puts loss on), and
their negative log-likelihood from a GGUF's own logits.

    heldout = load_heldout("outputs/llama-3.2-1b-finetome")      # that run's eval split, from its run.json
    scored = score_heldout(engine, "1B", heldout.conversations, n_ctx=4096)
    scored["perplexity"]
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from common.llama_runtime import open_gguf
from common.log import stage_logger
from space.engine import Engine
from train.config import TrainConfig, load_preset, resolve_local_path
from train.conversations import BadRow, DataError, assistant_spans, prepare_split, read_rows, standardize_row
from train.summary import DataSplit, RunSummaryError, load_run_summary

from common.formats import format_number

DEFAULT_HELDOUT_PRESET = "tiny"  # its eval split of the shipped sample; the published models never saw the sample
LOGIT_ROWS_PER_CHUNK = 64  # rows of the logits turned into log-probabilities at a time (64 × 128256 float64 = 66 MB)

log = stage_logger("compare").info


# ---------------------------------------------------------------------- the held-out conversations
@dataclass
class HeldOut:
    """Held-out conversations (role/content messages), where they come from (for the report), and the rows left out."""

    conversations: list[list[dict]]
    description: str
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (row number, reason) of rows left out


def eval_split(config: Mapping, origin: str) -> HeldOut:
    """The eval split a training run with this config held out: train/conversations.py's own prepare() with its dataset,
    split, seed, eval_samples and min_score (train.summary.DataSplit), so it is by construction what that run never
    trained on."""
    try:
        split = DataSplit.from_config(config)
    except ValueError as error:
        raise ValueError(f"{origin} {error}; give a .jsonl file instead") from error
    if not split.eval_samples:
        raise ValueError(f"{origin} held out no conversations (eval_samples 0); give a .jsonl file instead")
    prepared = prepare_split(split)
    return HeldOut(prepared.eval, f"the eval split of {origin}: {len(prepared.eval)} of {prepared.total_rows} rows "
                                  f"of `{split.dataset}`, seed {split.seed}")


def load_heldout(value: str | None) -> HeldOut:
    """Held-out conversations: the tiny preset's eval split (None), a training run's folder (its run.json), or a
    FineTome-format .jsonl/.json/.parquet file read and standardised as training reads it (all rows, bad ones
    left out). ValueError or train.conversations.DataError with a one-line reason otherwise."""
    if value is None:
        config = TrainConfig(**load_preset(DEFAULT_HELDOUT_PRESET)).to_dict()
        heldout = eval_split(config, f"the {DEFAULT_HELDOUT_PRESET} preset")
        heldout.description += (" (conversations written for this project: never trained on by a tiny run, and "
                                "never seen by models trained on FineTome-100k)")
        return heldout
    path = resolve_local_path(value)
    if path.is_dir():
        try:
            run = load_run_summary(path)
        except RunSummaryError as error:
            why = "is a folder without run.json" if error.absent else str(error)
            raise ValueError(f"{why}; give a training run's output folder or a .jsonl file") from error
        return eval_split(run.config, f"the training run {value}")
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


# ---------------------------------------------------------------------- which tokens count, and their score
def assistant_token_mask(pieces: Sequence[bytes], text: str, spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Which tokens training puts loss on, given each token's bytes, the rendered text and its assistant spans.

    The rule of train/conversations.py's tokenize_conversation on the tokenizer's own character offsets: a token counts when
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

    The normaliser is numpy's log-sum-exp (np.logaddexp.reduce), which never exponentiates a large logit.

    >>> token_log_probs(np.array([[0.0, 0.0], [math.log(3), 0.0]], dtype=np.float32), [1, 0]).round(4).tolist()
    [-0.6931, -0.2877]
    >>> token_log_probs(np.array([[1000.0, 1000.0]], dtype=np.float32), [0]).round(4).tolist()
    [-0.6931]
    """
    rows = np.asarray(logits, dtype=np.float64)
    return rows[np.arange(len(rows)), np.asarray(targets)] - np.logaddexp.reduce(rows, axis=1)


def perplexity(negative_log_likelihood: float, tokens: int) -> float | None:
    """exp(mean negative log-likelihood per token); None when nothing was scored.

    >>> round(perplexity(3 * math.log(4), 3), 6)
    4.0
    >>> perplexity(0.0, 0) is None
    True
    """
    return math.exp(negative_log_likelihood / tokens) if tokens else None


# ---------------------------------------------------------------------- measuring (llama.cpp)
class GgufChatTemplate:
    """A GGUF's chat template, rendered by the Space's own formatter, behind the one tokenizer method train/conversations.py
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
                         f"{format_number(perplexity(total_nll, total_scored))}")
    finally:
        scorer.close()
    return {"perplexity": perplexity(total_nll, total_scored), "conversations": len(per_conversation),
            "tokens": sum(c["tokens"] for c in per_conversation), "scored_tokens": total_scored,
            "truncated": sum(c["truncated"] for c in per_conversation), "negative_log_likelihood": total_nll,
            "seconds": round(time.perf_counter() - started, 2), "per_conversation": per_conversation}
