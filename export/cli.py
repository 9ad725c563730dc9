"""Command-line front end of the export stage: user mistakes become one line and a non-zero exit (common/cli.py)."""

from __future__ import annotations

import sys

from common.cli import EXIT_INTERRUPTED, UsageError, report_problem

from .config import config_from_args
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
        return report_problem(e)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command; completed stages are kept and skipped", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
