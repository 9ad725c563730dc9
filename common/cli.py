"""The command-line error protocol every entry script shares: a user's mistake is one `error:` line on stderr (all
of them at once, when there are several) and an exit status, never a traceback.

    exit 2  usage: a bad flag, value or config file (UsageError), found before any work starts
    exit 1  a problem met while working that the user can fix (the stage's own error type, one line)
    exit 130  interrupted (Ctrl-C): rerunning the same command continues
"""

from __future__ import annotations

import argparse
import sys

EXIT_PROBLEM, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class UsageError(ValueError):
    """One or more mistakes in how a command was called, each a line naming the flag, the value and the fix."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def report(self) -> int:
        """Print each problem as one `error:` line on stderr; returns the exit status for a usage mistake (2)."""
        for problem in self.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE


class UsageParser(argparse.ArgumentParser):
    """argparse, but a bad flag raises UsageError, so every mistake is reported the same way."""

    def error(self, message):
        raise UsageError([message])


def report_problem(error: BaseException) -> int:
    """A problem met while working, as one `error:` line on stderr; returns its exit status (1)."""
    print(f"error: {error}", file=sys.stderr)
    return EXIT_PROBLEM


def first_line(error: BaseException) -> str:
    """An exception's message on one line (its first), or its type's name when it has none.

    >>> first_line(ValueError("No file found in x\\n\\nAvailable Files:\\n[]"))
    'No file found in x'
    >>> first_line(KeyError())
    'KeyError'
    """
    text = str(error).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(error).__name__
