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
    """argparse, but a bad flag raises UsageError, so every mistake is reported the same way; a flag the command
    does not have is named first (argparse would only say that a required flag is missing)."""

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def unknown_flags(self, given: list[str]) -> list[str]:
        """The flags in `given` that this parser has not, nor abbreviates (values that look like numbers skipped).

        >>> parser = UsageParser(); _ = parser.add_argument("--adapter", required=True)
        >>> parser.unknown_flags(["--adapt", "x", "--bogus=1", "-5", "--", "--after"])
        ['--bogus']
        """
        known = self._option_string_actions
        unknown = []
        for word in given[: given.index("--")] if "--" in given else given:
            flag = word.split("=", 1)[0]
            if not flag.startswith("-") or flag in ("-", *known) or self._negative_number_matcher.match(flag):
                continue
            if not (flag.startswith("--") and any(option.startswith(flag) for option in known)):
                unknown.append(flag)
        return unknown

    def error(self, message):
        unknown = self.unknown_flags(getattr(self, "_given", []))
        if unknown and not message.startswith("unrecognized arguments"):
            message = f"unrecognized arguments: {' '.join(unknown)}"
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
