"""What one answer is while the batched decoder (space/batching.py) writes it: the Job (its prompt, settings, and the
scheduler's bookkeeping) and the events it streams back to the caller, in order:

    Queued(position)*  Started(read, cached)  Piece(text, tokens)*  Done(finish_reason, error)

A request refused at once (an empty or too long prompt, a full line) gets only Done("error", ...).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from space.replies import Sampling

__all__ = ["Job", "Queued", "Started", "Piece", "Done", "common_prefix"]


@dataclass(frozen=True)
class Queued:
    position: int  # 1 = next to get a slot


@dataclass(frozen=True)
class Started:
    read: int  # prompt tokens this turn reads (decodes)
    cached: int  # prompt tokens already in the slot's KV cache (or restored from the RAM cache)


@dataclass(frozen=True)
class Piece:
    text: str
    tokens: int = 1  # sampled tokens it holds (a character split over tokens comes with its last one)


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop", "length", "cancelled", "error"
    error: str | None = None


def common_prefix(a, b) -> int:
    """How many leading tokens `a` and `b` share.

    >>> common_prefix([1, 2, 3], [1, 2, 4, 5]), common_prefix([], [1]), common_prefix((7, 8), [7, 8])
    (2, 0, 2)
    """
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Utf8:
    """Bytes → text as they come: a character split over tokens waits for its last byte."""

    def __init__(self):
        self._pending = b""

    def feed(self, data: bytes) -> str:
        data = self._pending + data
        # Keep back an incomplete UTF-8 sequence at the end (at most 3 bytes).
        for back in range(1, min(4, len(data)) + 1):
            byte = data[-back]
            if byte & 0xC0 == 0x80:  # a continuation byte: look further back
                continue
            need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
            if need > back:
                self._pending = data[-back:]
                return data[:-back].decode("utf-8", "replace")
            break
        self._pending = b""
        return data.decode("utf-8", "replace")

    def flush(self) -> str:
        rest, self._pending = self._pending, b""
        return rest.decode("utf-8", "replace")


# ---------------------------------------------------------------- a request
class Scheduler(Protocol):
    """What a job needs of the thread that decodes it (space.batching.Scheduler), named here so this module does
    not import the one that imports it."""

    def is_current_thread(self) -> bool: ...

    def notify(self) -> None: ...


@dataclass(eq=False)
class Job:
    """One answer: its prompt, settings and the events streamed back. `cancel` (or closing events()) ends it."""

    tokens: list[int]  # the whole prompt
    sampling: Sampling
    seed: int
    stop_tokens: frozenset[int]
    stop_strings: tuple[str, ...] = ()
    cancel: threading.Event | None = None
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # the events, read by events()
    # the scheduler's
    slot: int | None = None
    fed: int = 0  # prompt tokens in the slot's KV cache
    generated: list[int] = field(default_factory=list)
    pending: int | None = None  # the sampled token not yet decoded
    abandoned: bool = False
    finished: bool = False
    ended: threading.Event = field(default_factory=threading.Event)  # set once its slot (or place in line) is free
    _sampler: object = None
    _utf8: Utf8 = field(default_factory=Utf8)
    _held: str = ""  # text held back while it could be the start of a stop string
    _unsent: int = 0  # sampled tokens whose text has not been sent yet
    sampled_at: list[float] = field(default_factory=list)  # perf_counter() of each sampled token, the stop included
    # The text each generated token was streamed as, where that is not its own piece (a character split over tokens
    # comes with its last token; bytes that are not UTF-8 come as U+FFFD): {position in `generated`: bytes}. The
    # conversation's next prompt holds the answer as it was streamed, and matches the tokens through this.
    streamed: dict[int, bytes] = field(default_factory=dict)

    def events(self, scheduler: Scheduler | None = None, poll_s: float = 0.1,
               close_wait_s: float = 10.0) -> Iterator[Queued | Started | Piece | Done]:
        """The job's events until Done. Closing this generator (a client gone) ends the job at the scheduler's next
        step and returns once its slot is free (at most `close_wait_s`), so a caller may reuse the model at once."""
        try:
            while True:
                try:
                    event = self.out.get(timeout=poll_s)
                except queue.Empty:
                    continue
                yield event
                if isinstance(event, Done):
                    return
        finally:
            self.abandoned = True
            # Not on the scheduler's own thread (a generator collected there): it is the one that frees the slot.
            if not self.ended.is_set() and scheduler is not None and not scheduler.is_current_thread():
                scheduler.notify()
                self.ended.wait(close_wait_s)

    def stopped(self) -> bool:
        return self.abandoned or (self.cancel is not None and self.cancel.is_set())

    def emit(self, event) -> None:
        self.out.put(event)


