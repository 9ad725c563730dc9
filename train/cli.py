"""Command-line front end of the training stage: parse, validate, run, and turn user mistakes into
one clear line and an exit code instead of a traceback (common/cli.py)."""

from __future__ import annotations

import sys

from common.cli import EXIT_INTERRUPTED, UsageError, report_problem

from .checkpoints import ResumeError
from .config import config_from_args
from .conversations import DataError


def main(argv: list[str] | None = None) -> int:
    try:
        config = config_from_args(argv)
    except UsageError as e:
        return e.report()
    if config.stage == "dpo":
        from .dpo import run_dpo as run  # heavy imports only once the config is known to be good
    else:
        from .trainer import run

    try:
        run(config)
    except UsageError as e:
        return e.report()
    except ResumeError as e:  # an impossible resume is a usage mistake: exit 2
        return UsageError([str(e)]).report()
    except DataError as e:  # the dataset is unusable: exit 1
        return report_problem(e)
    except KeyboardInterrupt:
        print(f"\ninterrupted: rerun the same command to continue from the newest checkpoint in "
              f"{config.output_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
