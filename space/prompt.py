"""What a loaded model reads and keeps: the prompt's tokens (the chat template's markers as special tokens, what
people wrote as text), the reuse of the tokens already in its context, and its saved prompt states within a bound.

    model = ChatModel(llm, gguf_chat_formatter(llm))
    model.count_tokens([{"role": "user", "content": "<|eot_id|> is ten characters here"}])
    llm.set_cache(StateCache(512 * 2**20))   # at most 512 MiB of saved states, least recently used evicted first

space/engine.py uses both for every model it loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llama_cpp import Llama, LlamaRAMCache
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from space.history import reusable_prefix
from space.replies import UserError

__all__ = ["ChatModel", "StateCache", "state_bytes"]

_CONTROL = b"\xff"  # before a control token's bytes where prompts are matched with the context (never in UTF-8)
_MARK = " \ue000{}\ue001 "  # stands for message i's content while the template renders; spaces show whether it trims
_KEY_BYTES_PER_TOKEN = 36  # a cache key is a tuple of Python ints: an 8-byte pointer and a 28-byte int per token


@dataclass
class ChatModel:
    """A loaded model and the chat formatter its GGUF's template makes."""

    llm: Llama
    formatter: Jinja2ChatFormatter

    def __post_init__(self):
        # Llama keeps an n_batch × n_vocab float32 logits buffer (262 MB for Llama 3's vocabulary) that nothing
        # reads with logits_all=False (llama.cpp samples from its own logits) but that save_state copies and
        # load_state writes, rows of it at a time: RSS grew by up to 262 MB per model with the first restored
        # state and every save copied up to as much. One cell keeps the shapes those methods index.
        if not self.llm._logits_all:
            self.llm.scores = np.zeros((1, 1), dtype=np.single)

    def segments(self, messages: list[dict]) -> tuple[list[tuple[bytes, bool]], object]:
        """The prompt as (bytes, special) parts, and the formatter's response (stop strings and tokens).

        The template's own text is tokenized with its markers as special tokens (<|start_header_id|>, <|eot_id|>);
        what users and the system prompt wrote is tokenized as text, so `<|eot_id|>` typed in a message is ten
        characters, not the end of a turn, and nobody can forge a turn of the conversation. The template renders
        a mark in place of each content, and the content goes where its mark landed, trimmed when the template
        trims (Llama 3's does).
        """
        marked = [{**message, "content": _MARK.format(i)} for i, message in enumerate(messages)]
        rendered = self.formatter(messages=marked)
        text, parts, position = rendered.prompt, [], 0
        for i, message in enumerate(messages):
            mark, content = _MARK.format(i), str(message["content"])
            at = text.find(mark, position)
            if at < 0:  # the template trimmed the mark's spaces: it trims contents
                mark, content = mark.strip(), content.strip()
                at = text.find(mark, position)
            if at < 0:
                raise UserError(f"The model's chat template does not show message {i + 1} as written; this Space "
                                "cannot serve it safely (re-export it with export/to_gguf.py)")
            parts += [(text[position:at], True), (content, False)]
            position = at + len(mark)
        parts.append((text[position:], True))
        return [(part.encode("utf-8"), special) for part, special in parts if part], rendered

    def _tokenize(self, parts: list[tuple[bytes, bool]], skip: int = 0) -> list[int]:
        """The parts' tokens, from byte `skip` of their marked form on (see _marked; the template writes
        <|begin_of_text|> itself: no BOS added)."""
        tokens, start = [], 0
        for data, special in parts:
            if start + len(data) > skip:
                rest = data[max(0, skip - start):].replace(_CONTROL, b"")
                tokens += self.llm.tokenize(rest, add_bos=False, special=special)
            start += len(data)
        return tokens

    def _marked(self, parts: list[tuple[bytes, bool]]) -> list[tuple[bytes, bool]]:
        """The parts with _CONTROL before each control token the template's own text holds, as _piece spells them,
        so that prefix reuse matches a control token only with a control token, never with the same characters
        typed by a user (no UTF-8 text holds the byte 0xFF)."""
        return [(b"".join(self._piece(token) for token in self.llm.tokenize(data, add_bos=False, special=True))
                 if special else data, special) for data, special in parts]

    def prompt_tokens(self, messages: list[dict]) -> tuple[list[int], object]:
        """The prompt's tokens, and the formatter's response (stop strings and tokens), continuing from the tokens
        already in the model's context wherever they spell the same text, control tokens as control tokens (see
        reusable_prefix)."""
        parts, rendered = self.segments(messages)
        marked = self._marked(parts)
        context = [int(token) for token in self.llm.input_ids[: self.llm.n_tokens]]  # the tokens in the context
        kept, offset = reusable_prefix(context, self._piece, b"".join(data for data, _ in marked))
        return context[:kept] + self._tokenize(marked, offset), rendered

    def _piece(self, token: int) -> bytes:
        """The token's bytes; a control token's (<|eot_id|>, ...) after _CONTROL, and a byte token's that holds
        _CONTROL (the model may sample one) as bytes no prompt holds, so it never stands for a marker."""
        text = self.llm.detokenize([token], special=True)
        if text and not self.llm.detokenize([token], special=False):
            return _CONTROL + text
        return _CONTROL * 2 if _CONTROL in text else text

    def count_tokens(self, messages: list[dict]) -> int:
        """Tokens of the prompt exactly as it is generated from (see segments)."""
        return len(self._tokenize(self.segments(messages)[0]))


def state_bytes(key: tuple, state) -> int:
    """The memory a saved state holds in the cache: llama.cpp's state (the KV cache of its tokens), Llama's token and
    logits arrays, and the key's tokens as Python ints."""
    return len(state.llama_state) + state.input_ids.nbytes + state.scores.nbytes + _KEY_BYTES_PER_TOKEN * len(key)


class StateCache(LlamaRAMCache):
    """llama-cpp-python's RAM cache of prompt states, bounded by all the memory its states hold, least recently
    used (saved or restored) evicted first, and without states that a newer one extends.

    LlamaRAMCache counts only llama.cpp's state against its capacity: Llama's logits copy (half a megabyte a state
    for Llama 3 even when slim) and its token array went uncounted, so the cache of a Space serving many short
    conversations outgrew its bound several times over. Each answer saves its conversation's state, whose tokens
    extend that conversation's previous one; the longer state serves any prompt at least as well, so the shorter
    is dropped rather than left to fill the capacity (32 KiB per token for 1B, 112 KiB for 3B).
    `llm`: the model the cache serves, whose context decides which lookups are restores (see __getitem__).
    """

    def __init__(self, capacity_bytes: int, llm: Llama | None = None):
        super().__init__(capacity_bytes)
        self.llm = llm
        self._sizes: dict[tuple, int] = {}
        self._total = 0  # one int, so that another thread (the memory log) reads it while states change

    @property
    def cache_size(self) -> int:
        return self._total

    def __setitem__(self, key, value):
        key = tuple(key)
        for older in [k for k in self.cache_state if len(k) <= len(key) and key[: len(k)] == k]:
            self._drop(older)
        size = state_bytes(key, value)
        if size > self.capacity_bytes:  # bigger than the whole bound: not kept
            return
        self.cache_state[key], self._sizes[key] = value, size
        self._total += size
        while self._total > self.capacity_bytes:
            self._drop(next(iter(self.cache_state)))  # the least recently used (LlamaRAMCache's order)

    def __getitem__(self, key):
        """The state sharing the longest prefix with `key`, made the most recently used, when Llama will restore it:
        when it holds more of `key` than the model's context does. Otherwise KeyError (Llama's miss), so that a
        state sharing only the system prompt with every request is not refreshed by all of them and kept forever.
        """
        key = tuple(key)
        found = self._find_longest_prefix_key(key)
        state = self.cache_state.get(found)
        in_context = [] if self.llm is None else self.llm.input_ids[: self.llm.n_tokens].tolist()
        if state is None or (Llama.longest_token_prefix(found[: state.n_tokens], key)
                             <= Llama.longest_token_prefix(in_context, key)):
            raise KeyError("no saved state holds more of this prompt than the context")
        self.cache_state.move_to_end(found)
        return state

    def _drop(self, key: tuple) -> None:
        del self.cache_state[key]
        self._total -= self._sizes.pop(key)
