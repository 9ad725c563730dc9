"""Servers started as child processes: a free port to start one on, and the wait until it answers. Used by the
OpenAI-compatible servers (space/servers.py), the benchmarks and the tests that start the Space for real.

    port = free_port()
    process = subprocess.Popen([..., "--port", str(port)])
    wait_until_answers(f"http://127.0.0.1:{port}/v1/models", process, timeout=120, log=Path("server.log"))
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["ServerNotReady", "free_port", "wait_until_answers"]

STILL_LOADING = 503  # llama-server answers 503 while it loads the model: not ready yet


class ServerNotReady(RuntimeError):
    """The server exited, or did not answer in time; the message says which, with the end of its log if given."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it; a server started right after gets it in practice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answers(url: str, process: subprocess.Popen, timeout: float = 120, log: Path | None = None,
                       poll_s: float = 0.3) -> None:
    """Poll `url` until the server answers: any HTTP status counts (a 401 wants a key, a 404 is a page it lacks),
    except 503 (still loading). ServerNotReady when the process exits first or `timeout` seconds pass.

    >>> import sys
    >>> wait_until_answers("http://127.0.0.1:9/", subprocess.Popen([sys.executable, "-c", "exit(3)"]), timeout=5)
    Traceback (most recent call last):
    common.processes.ServerNotReady: the server exited with status 3 before http://127.0.0.1:9/ answered
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError as error:
            if error.code != STILL_LOADING:
                return
        except OSError:
            pass  # not listening yet
        if process.poll() is not None:
            raise ServerNotReady(f"the server exited with status {process.returncode} before {url} answered"
                                 + _log_tail(log))
        if time.monotonic() > deadline:
            raise ServerNotReady(f"{url} did not answer within {timeout:.0f} s" + _log_tail(log))
        time.sleep(poll_s)


def _log_tail(log: Path | None, chars: int = 3000) -> str:
    if log is None:
        return ""
    try:
        return f"; the end of {log.name}:\n{log.read_text(errors='replace')[-chars:]}"
    except OSError:
        return ""
