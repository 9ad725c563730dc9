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

from space.history import prompt_text
from space.replies import UserError, _one_line, valid_unicode

__all__ = ["Stops", "flag", "shown_message", "rejected"]

log = logging.getLogger("space.requests")


def rejected(endpoint: str, problem: str) -> None:
    """The one log line of a request answered with `problem` instead of an answer (no traceback: ours are bugs)."""
    log.info("rejected %s: %s", endpoint, _one_line(problem, 200))


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
    raise UserError(f"{name} must be true or false, not {_one_line(repr(value), 40)}.")


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

    >>> from types import SimpleNamespace
    >>> stops, nobody = Stops(), None
    >>> mine, other = SimpleNamespace(session_hash="s1"), SimpleNamespace(session_hash="s2")
    >>> with stops.running(mine, "compare") as cancel, stops.running(nobody, "compare") as unreachable:
    ...     stops.stop(other, "compare"), stops.stop(nobody, "compare"), cancel.is_set()
    ...     stops.stop(mine, "compare"), cancel.is_set(), unreachable.is_set()
    (False, False, False)
    (True, True, False)
    >>> stops.stop(mine, "compare"), len(stops)
    (False, 0)
    """

    def __init__(self):
        self._events: dict[tuple[str | None, str], threading.Event] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(request, tab: str) -> tuple[str | None, str]:
        return getattr(request, "session_hash", None), tab

    @contextmanager
    def running(self, request, tab: str):
        key, event = self._key(request, tab), threading.Event()
        if key[0] is None:
            yield event
            return
        with self._lock:
            self._events[key] = event
        try:
            yield event
        finally:
            with self._lock:
                if self._events.get(key) is event:
                    del self._events[key]

    def stop(self, request, tab: str) -> bool:
        """Set the session's cancel event for `tab`; whether a request was running."""
        with self._lock:
            event = self._events.get(self._key(request, tab))
        if event is not None:
            event.set()
        return event is not None

    def __len__(self) -> int:
        return len(self._events)
