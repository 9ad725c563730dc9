"""Progress lines of the command-line tools, through `logging`: each stage logs to its own logger
(`finetome.export`, `finetome.train`, …), which prints every message as one plain line, so a library user can
quiet or redirect a stage with logging's own settings, e.g. `logging.getLogger("finetome.export").setLevel("WARNING")`.

    log = stage_logger("export").info
    log("merge: base + adapter -> merged-16bit")
"""

from __future__ import annotations

import logging
import sys


class _CurrentStream(logging.StreamHandler):
    """Writes to sys.stdout or sys.stderr as they are when each line is logged (pytest and callers replace them)."""

    def __init__(self, name: str):
        super().__init__()
        self.stream_name = name

    @property
    def stream(self):
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, value):  # logging.StreamHandler.__init__ assigns one; the current one is always used instead
        pass


def stage_logger(stage: str, stream: str = "stdout", prefix: str = "") -> logging.Logger:
    """The logger `finetome.<stage>`: INFO and above, each message on one line (after `prefix`), flushed, on
    `stream` ("stdout" or "stderr"). Set up once per stage; later calls return the same logger."""
    logger = logging.getLogger(f"finetome.{stage}")
    if not logger.handlers:
        handler = _CurrentStream(stream)
        handler.setFormatter(logging.Formatter(prefix.replace("%", "%%") + "%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # the line is printed once, whatever the root logger does
    return logger
