"""The command-line error protocol every entry script shares: a user's mistake is one `error:` line on stderr (all
of them at once, when there are several) and an exit status, never a traceback.

    exit 2  usage: a bad flag, value or config file (UsageError), found before any work starts
    exit 1  a problem met while working that the user can fix (the stage's own error type, one line)
    exit 130  interrupted (Ctrl-C): rerunning the same command continues

A stage's settings are one dataclass whose fields are its flags (`config_field`: the default and the help in one
place); `add_config_flags` builds the parser from those fields, so no default or help is typed twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import Any

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


SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair: no UTF-8 encoder takes it


def one_line(text: str, limit: int = 300) -> str:
    """Text collapsed onto one line and cut to `limit` characters (for messages shown in the UI).

    >>> one_line("two\\n  lines")
    'two lines'
    >>> one_line("x" * 10, limit=5)
    'xxxx…'
    >>> one_line("half a pair: " + chr(0xD800))  # shown, and sent as JSON, as U+FFFD
    'half a pair: �'
    """
    text = " ".join(valid_unicode(str(text)).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def valid_unicode(text: str) -> str:
    """`text` with each lone surrogate (half of a UTF-16 pair, which no UTF-8 encoder takes) replaced by U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return SURROGATE.sub("\ufffd", text)


def first_line(error: BaseException) -> str:
    """An exception's message on one line (its first), or its type's name when it has none.

    >>> first_line(ValueError("No file found in x\\n\\nAvailable Files:\\n[]"))
    'No file found in x'
    >>> first_line(KeyError())
    'KeyError'
    """
    text = str(error).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(error).__name__


# ---------------------------------------------------------------------- settings: one dataclass field per flag
ARGPARSE_KEYS = ("action", "nargs", "const", "metavar", "type")
# A field's annotation (a string under `from __future__ import annotations`) -> how its flag parses a value.
DEFAULT_KINDS: dict[str, dict[str, Any]] = {
    "int": {"type": int}, "int | None": {"type": int}, "float": {"type": float}, "float | None": {"type": float},
    "bool": {"action": "store_true"},
}


def config_field(default: Any = dataclasses.MISSING, help: str = "", **metadata) -> Any:
    """A setting of a stage's config dataclass: its default (none: a required flag) and `help`, its flag's --help,
    where `{default}` stands for the default. `choices` is for the config's validate() to check and shows as the
    flag's metavar; action, nargs, const, metavar and type go to argparse as given. A list default is copied for
    every object."""
    metadata = {"help": help, **metadata}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_default(field: dataclasses.Field) -> Any:
    """A field's default value (a fresh one from its factory); dataclasses.MISSING when it has none."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def help_with_default(text: str, default: Any, *, always: bool = False, separator: str = ",") -> str:
    """A flag's help with its default: in place of `{default}`, else appended; a default that is no value (None,
    False, empty, none at all) is left to the text to explain, unless `always`.

    >>> help_with_default("context length (default: {default}); longer ones are cut", 4096)
    'context length (default: 4096); longer ones are cut'
    >>> help_with_default("quant types", ["q4_k_m", "q8_0"], separator=" ")
    'quant types (default: q4_k_m q8_0)'
    >>> help_with_default("quantization threads (default: usable CPUs)", None)
    'quantization threads (default: usable CPUs)'
    >>> help_with_default("use at most this many", None, always=True)
    'use at most this many (default: None)'
    """
    shown = separator.join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
    if "{default}" in text:
        return text.replace("{default}", shown)
    if default is dataclasses.MISSING or not always and (default is None or default is False or default == []):
        return text
    return f"{text} (default: {shown})"


def add_config_flags(parser: argparse.ArgumentParser, config_class: type, *, kinds: dict[str, dict] | None = None,
                     layered: bool = False) -> None:
    """One flag per field of `config_class` that has help (config_field): --field-name, parsed by its annotation's
    entry in `kinds` (DEFAULT_KINDS unless given), with the dataclass's default and the field's help.

    layered: a flag left out is absent from the parsed namespace (argparse.SUPPRESS), so what lies under the flags
    (a preset, a config file) keeps its values, and every help shows the built-in default, the bottom layer.
    Otherwise a flag left out takes the dataclass's default, and a field without one is a required flag.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Example:
    ...     adapter: str = config_field(help="the adapter folder")
    ...     probes: int = config_field(8, "behaviour probes")
    ...     push: bool = config_field(False, "upload the result")
    >>> parser = UsageParser(); add_config_flags(parser, Example)
    >>> Example(**vars(parser.parse_args(["--adapter", "a", "--probes", "3"])))
    Example(adapter='a', probes=3, push=False)
    >>> parser.parse_args([])
    Traceback (most recent call last):
    common.cli.UsageError: the following arguments are required: --adapter
    """
    kinds = DEFAULT_KINDS if kinds is None else kinds
    for field in dataclasses.fields(config_class):
        if not field.init or "help" not in field.metadata:
            continue
        metadata = field.metadata
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
        kwargs: dict[str, Any] = {"dest": field.name, **kinds.get(kind, {})}
        kwargs.update({key: metadata[key] for key in ARGPARSE_KEYS if key in metadata})
        if metadata.get("choices") and "metavar" not in metadata:
            kwargs["metavar"] = "{" + ",".join(metadata["choices"]) + "}"
        default = field_default(field)
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = argparse.SUPPRESS if layered else default
        separator = " " if kwargs.get("nargs") in ("+", "*") else ","
        kwargs["help"] = help_with_default(metadata["help"], default, always=layered, separator=separator)
        parser.add_argument("--" + field.name.replace("_", "-"), **kwargs)
