"""What the Space's endpoints share about the requests in flight: the Stop buttons' cancel events, the checks of
values that Gradio passes through unchecked, and the one log line per rejected request.

    stops = Stops()
    with stops.running(request, "compare") as cancel:    # the engine stops at its next token once it is set
        ...
    stops.stop(request, "compare")                        # the Stop button's handler

The endpoints take their inputs unprocessed (Gradio's own preprocessing raises, with a traceback in the log, on a
string where a slider's number goes), so every value is checked here or by the engine, and a bad one is answered
in one line.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

from common.cli import one_line, valid_unicode
from space.history import prompt_text
from space.replies import UserError

__all__ = ["Stops", "flag", "shown_message", "rejected"]

log = logging.getLogger("space.requests")


def rejected(endpoint: str, problem: str) -> None:
    """The one log line of a request answered with `problem` instead of an answer (no traceback: ours are bugs)."""
    log.info("rejected %s: %s", endpoint, one_line(problem, 200))


def flag(value, name: str) -> bool:
    """A checkbox's value: True, False, or None (unset: False); UserError naming the setting for anything else.

    >>> flag(None, "Blind"), flag(True, "Blind")
    (False, True)
    >>> flag("yes", "Blind")
    Traceback (most recent call last):
    space.replies.UserError: Blind must be true or false, not 'yes'.
    """
    if value is None or isinstance(value, bool):
        return bool(value)
    raise UserError(f"{name} must be true or false, not {one_line(repr(value), 40)}.")


def shown_message(message) -> str:
    """The user's message as a chat panel shows it above the answers: its text, or '' when it is not text.

    >>> shown_message([{"type": "text", "text": "Hi"}]), shown_message(None), shown_message(3)
    ('Hi', '', '')
    """
    try:
        return prompt_text(message, "message")
    except UserError:
        return valid_unicode(message) if isinstance(message, str) else ""


class Stops:
    """A cancel event per request in flight, by (session, tab): the Stop button sets it, so the engine stops at
    its next token and frees the model (both models of a compare) at once, instead of when Gradio gets to close
    the abandoned generator. A session's newer request replaces its older one's event. A request without a session
    (a raw client that sends none) gets an event no Stop can reach: it stops by closing its connection.

    A request may leave what it is working on (`work`, e.g. the compare's state): stop() hands it to the Stop
    handler, which then acts on the request it stopped, not on what Gradio's State held when Stop was clicked
    (the previous compare's, until the new one's first update lands).

    >>> from types import SimpleNamespace
    >>> stops, nobody = Stops(), None
    >>> mine, other = SimpleNamespace(session_hash="s1"), SimpleNamespace(session_hash="s2")
    >>> with stops.running(mine, "compare", {"n": 2}) as cancel, stops.running(nobody, "compare") as unreachable:
    ...     stops.stop(other, "compare"), stops.stop(nobody, "compare"), cancel.is_set()
    ...     stops.stop(mine, "compare"), cancel.is_set(), unreachable.is_set()
    (None, None, False)
    ({'n': 2}, True, False)
    >>> stops.stop(mine, "compare"), len(stops)
    (None, 0)
    """

    def __init__(self):
        self._running: dict[tuple[str, str], tuple[threading.Event, object]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(request, tab: str) -> tuple[str | None, str]:
        return getattr(request, "session_hash", None), tab

    @contextmanager
    def running(self, request, tab: str, work: object = True):
        """The request's cancel event while it runs; `work` is what stop() hands to the Stop handler."""
        key, event = self._key(request, tab), threading.Event()
        if key[0] is None:
            yield event
            return
        with self._lock:
            self._running[key] = event, work
        try:
            yield event
        finally:
            with self._lock:
                if self._running.get(key, (None,))[0] is event:
                    del self._running[key]

    def stop(self, request, tab: str):
        """Set the cancel event of the session's request in `tab`; that request's `work`, or None if none ran."""
        with self._lock:
            event, work = self._running.get(self._key(request, tab), (None, None))
        if event is not None:
            event.set()
        return work

    def __len__(self) -> int:
        return len(self._running)
