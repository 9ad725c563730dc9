"""What a loaded model reads: the prompt's tokens (the chat template's markers as special tokens, what people wrote
as text), continuing from the tokens a conversation already produced, and where an answer stops.

    model = ChatModel(llm, gguf_chat_formatter(llm))
    model.count_tokens([{"role": "user", "content": "<|eot_id|> is ten characters here"}])
    tokens, rendered = model.prompt_tokens(messages, known=[previous_turn_tokens])

space/engine.py makes one for every model it loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from common.llama_runtime import token_piece
from space.history import reusable_prefix
from space.replies import UserError

__all__ = ["ChatModel"]

_CONTROL = b"\xff"  # before a control token's bytes where prompts are matched with the context (never in UTF-8)
_MARK = " \ue000{}\ue001 "  # stands for message i's content while the template renders; spaces show whether it trims


@dataclass
class ChatModel:
    """A loaded model and the chat formatter its GGUF's template makes."""

    llm: Llama
    formatter: Jinja2ChatFormatter
    _pieces: dict[int, bytes] = field(default_factory=dict, repr=False)

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

    def prompt_tokens(self, messages: list[dict], known=()) -> tuple[list[int], object]:
        """The prompt's tokens, and the formatter's response (stop strings and tokens), continuing from the `known`
        token sequence that spells the longest part of it (see continue_from)."""
        tokens, rendered, _ = self.continue_from(messages, known)
        return tokens, rendered

    def continue_from(self, messages: list[dict], known=()) -> tuple[list[int], object, dict[int, bytes]]:
        """The prompt's tokens continuing from the `known` token sequence (a conversation's earlier prompt and
        sampled answers, a slot's tokens) that spells the longest part of it, control tokens as control tokens (see
        reusable_prefix); the formatter's response; and where the kept tokens were streamed as other text than
        their own pieces ({position: bytes}).

        A known sequence is a list of token ids, or (token ids, {position: bytes streamed}) for one whose answers
        were streamed: a character split over tokens came with its last token, bytes that were not UTF-8 as U+FFFD,
        and that is what the conversation sends back, so that is what those positions must spell.
        """
        parts, rendered = self.segments(messages)
        marked = self._marked(parts)
        text = b"".join(data for data, _ in marked)
        best, kept, offset, overrides = [], 0, 0, {}
        for candidate in known:
            tokens, streamed = candidate if isinstance(candidate, tuple) else (candidate, {})
            if streamed:  # matched by position: the same token may have been streamed differently elsewhere
                n, at = reusable_prefix(range(len(tokens)), lambda i, tokens=tokens, streamed=streamed: streamed[i]
                                        if i in streamed else self._piece(tokens[i]), text)
            else:
                n, at = reusable_prefix(tokens, self._piece, text)
            if n > kept:
                best, kept, offset, overrides = tokens, n, at, streamed
        kept_overrides = {position: data for position, data in overrides.items() if position < kept}
        return list(best[:kept]) + self._tokenize(marked, offset), rendered, kept_overrides

    def stop_tokens(self) -> frozenset[int]:
        """The tokens that end an answer beside the vocabulary's end-of-generation ones: the template's own."""
        return frozenset(self.formatter.stop_token_ids or ())

    def stop_strings(self, rendered) -> tuple[str, ...]:
        """The formatter's stop strings that are text; one that is a control token's name (<|eot_id|>) stops only as
        that token, so an answer that writes those characters as text goes on (as a user's message does)."""
        stops = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop] if rendered.stop else []
        return tuple(stop for stop in stops if stop and not self._is_control(stop))

    def _is_control(self, text: str) -> bool:
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return len(tokens) == 1 and not self.llm.detokenize(tokens, special=False)

    def streamed_as(self, token: int) -> bytes | None:
        """What `token` streams as in an answer where that is not its piece here: nothing for a control token (a
        model may sample <|reserved_special_token_…|>), so the conversation sends back text without it; else None."""
        piece = self._piece(token)
        return b"" if piece.startswith(_CONTROL) and piece != _CONTROL * 2 else None

    def _piece(self, token: int) -> bytes:
        """The token's bytes; a control token's (<|eot_id|>, ...) after _CONTROL, and a byte token's that holds
        _CONTROL (the model may sample one) as bytes no prompt holds, so it never stands for a marker."""
        piece = self._pieces.get(token)
        if piece is None:
            text = token_piece(self.llm, token, special=True)  # not llm.detokenize: it drops pieces over 32 bytes
            if text and not token_piece(self.llm, token, special=False):
                piece = _CONTROL + text
            else:
                piece = _CONTROL * 2 if _CONTROL in text else text
            self._pieces[token] = piece
        return piece

    def count_tokens(self, messages: list[dict]) -> int:
        """Tokens of the prompt exactly as it is generated from (see segments)."""
        return len(self._tokenize(self.segments(messages)[0]))

