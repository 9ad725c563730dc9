"""Command-line front end of the export stage: user mistakes become one line and a non-zero exit."""

from __future__ import annotations

import sys

from .config import UsageError, config_from_args
from .errors import ExportError


def main(argv: list[str] | None = None, client=None) -> int:
    try:
        config = config_from_args(argv)
    except UsageError as e:
        return e.report()
    from .pipeline import run

    try:
        run(config, client=client)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command; completed stages are kept and skipped", file=sys.stderr)
        return 130
    return 0
