"""What a request may ask and what comes back: the user's mistakes (UserError), the sampling settings and their
bounds, the streamed Reply, and the throttle that paces updates to the browser.

    from space.replies import Sampling, TEMPERATURE_RANGE
    Sampling(temperature=5).clamped().temperature == TEMPERATURE_RANGE[1]    # True

The bounds below are written once: Sampling.clamped() enforces them and space/app.py's sliders show them.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from common.cli import one_line

__all__ = [
    "UserError", "Sampling", "Reply", "throttled",
    "TEMPERATURE_RANGE", "DEFAULT_TEMPERATURE", "TOP_P_RANGE", "DEFAULT_TOP_P",
    "MAX_NEW_TOKENS_RANGE", "DEFAULT_MAX_NEW_TOKENS",
]

# The sampling bounds: (lowest, highest) and the default of each setting.
TEMPERATURE_RANGE = (0.0, 2.0)  # 0 = greedy (deterministic)
DEFAULT_TEMPERATURE = 0.7
TOP_P_RANGE = (0.05, 1.0)
DEFAULT_TOP_P = 0.9
MAX_NEW_TOKENS_RANGE = (16, 1024)
DEFAULT_MAX_NEW_TOKENS = 256



class UserError(ValueError):
    """A one-line message to show the user as is (what is wrong, with which value, and the fix)."""


def _clamp(name: str, value, low: float, high: float, default: float) -> tuple[float, str | None]:
    """`value` forced into [low, high] (None: `default`), or a problem naming the setting for anything that is not
    a finite number ("abc", True, NaN, inf)."""
    if value is None:
        return default, None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return default, f"{name} must be a number from {low:g} to {high:g}, not {one_line(repr(value), 40)}"
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range: out of range, like any other too big number
        number = high if value > 0 else low
    if not math.isfinite(number):
        return default, f"{name} must be a finite number from {low:g} to {high:g}, not {number}"
    return min(max(number, low), high), None


@dataclass(frozen=True)
class Sampling:
    """Generation settings, as the UI's sliders (or any API caller) send them."""

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    def clamped(self) -> Sampling:
        """The settings within their bounds (out-of-range numbers clamped, None the default); UserError naming every
        setting that is not a finite number.

        >>> Sampling(temperature=-5, top_p=7, max_new_tokens=10**400).clamped()
        Sampling(temperature=0.0, top_p=1.0, max_new_tokens=1024)
        >>> Sampling(temperature=None, top_p=None, max_new_tokens=None).clamped()
        Sampling(temperature=0.7, top_p=0.9, max_new_tokens=256)
        >>> Sampling(temperature=float("nan"), top_p="high", max_new_tokens=float("inf")).clamped()
        Traceback (most recent call last):
        space.replies.UserError: Temperature must be a finite number from 0 to 2, not nan; top_p must be a number \
from 0.05 to 1, not 'high'; Max new tokens must be a finite number from 16 to 1024, not inf.
        """
        checked = [_clamp("Temperature", self.temperature, *TEMPERATURE_RANGE, DEFAULT_TEMPERATURE),
                   _clamp("top_p", self.top_p, *TOP_P_RANGE, DEFAULT_TOP_P),
                   _clamp("Max new tokens", self.max_new_tokens, *MAX_NEW_TOKENS_RANGE, DEFAULT_MAX_NEW_TOKENS)]
        if problems := [problem for _, problem in checked if problem]:
            raise UserError("; ".join(problems) + ".")
        (temperature, _), (top_p, _), (max_new_tokens, _) = checked
        return Sampling(temperature=temperature, top_p=top_p, max_new_tokens=int(max_new_tokens))


@dataclass
class Reply:
    """One streamed state of an answer: the text so far and live statistics."""

    text: str
    done: bool = False
    ttft_s: float | None = None  # time to first token from the request: loading and waiting for the model included
    # Streamed pieces: one per token, except that llama-cpp-python holds back bytes that are not yet valid
    # UTF-8 (a character split over tokens; random weights can stall it until the end) and sends them as one.
    tokens: int = 0
    tokens_per_s: float | None = None  # decoding speed after the first token
    finish_reason: str | None = None  # "stop" (end of turn), "length", "cancelled", "error"
    error: str | None = None  # a message for the user instead of an answer
    status: str | None = None  # before the first token, what the answer waits for (its place in the model's line)
    prompt_tokens: int | None = None  # the prompt's length in tokens (a local model's)
    prompt_read: int | None = None  # how many of them this turn read; the rest were in the model's cache
    token_times: tuple[float, ...] | None = None  # on the done Reply: perf_counter() of each sampled token

    def add(self, piece: str, started: float, tokens: int = 1) -> None:
        """One streamed piece of `tokens` tokens: the text grows, time to first token is set on the first (from
        `started`, when the request came), tokens/s counts the tokens after it.

        >>> reply = Reply("")
        >>> reply.add("Hi", started=time.perf_counter()); reply.text, reply.tokens, reply.tokens_per_s is None
        ('Hi', 1, True)
        """
        now = time.perf_counter()
        if self.ttft_s is None:
            self.ttft_s = now - started
        self.text += piece
        self.tokens += tokens
        if self.tokens > 1 and now - started > self.ttft_s:
            self.tokens_per_s = (self.tokens - 1) / (now - started - self.ttft_s)

    def stats(self) -> str:
        """One line for the UI: the status until the first token, then the statistics.

        >>> Reply("Hi there", ttft_s=0.123, tokens=57, tokens_per_s=34.49).stats()
        'TTFT 0.12 s · 34.5 tok/s · 57 tokens'
        >>> Reply("Hi", ttft_s=0.5, tokens=1).stats()
        'TTFT 0.50 s · 1 token'
        >>> Reply("Hi", ttft_s=0.5, tokens=1, prompt_tokens=1200, prompt_read=14).stats()
        'TTFT 0.50 s · 1 token · read 14 of 1,200 prompt tokens'
        >>> Reply("").stats()
        ''
        >>> Reply("", status="Model 3B is answering 4 other conversations; you are number 2 in line.").stats()
        'Model 3B is answering 4 other conversations; you are number 2 in line.'
        """
        if self.ttft_s is None:
            return self.status or ""
        parts = [f"TTFT {self.ttft_s:.2f} s"]
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.1f} tok/s")
        parts.append(f"{self.tokens} token{'s' if self.tokens != 1 else ''}")
        if self.prompt_read is not None:
            parts.append(f"read {self.prompt_read:,} of {self.prompt_tokens:,} prompt tokens")
        return " · ".join(parts)


def throttled(updates: Iterable, interval: float, clock: Callable[[], float] = time.perf_counter) -> Iterator:
    """The first update at once, then at most one every `interval` seconds (the newest), and always the last.

    Every update is diffed, serialised and sent by Gradio, and re-rendered (Markdown) by each browser watching.
    Ten updates a second still read as smooth streaming and send about a quarter as many updates as one per token
    for a 1B model. On the server's side the difference is within the noise of a 2-core machine; the gain is the
    browsers' and the network's (the figures: README.md's serve section, docs/benchmarks.md "Through the Space").
    The first token is never held back.

    >>> ticks = iter([0.0, 0.01, 0.02, 0.15, 0.16, 0.17])
    >>> list(throttled(range(6), 0.1, clock=lambda: next(ticks)))
    [0, 3, 5]
    >>> list(throttled(range(3), 0))
    [0, 1, 2]
    """
    last_sent, pending, waiting = None, None, False
    try:
        for update in updates:
            now = clock()
            if last_sent is None or now - last_sent >= interval:
                yield update
                last_sent, waiting = now, False
            else:
                pending, waiting = update, True
        if waiting:
            yield pending
    finally:
        close = getattr(updates, "close", None)
        if close is not None:
            close()  # a closed consumer (Stop, client gone) ends the generation and frees the model's lock now
