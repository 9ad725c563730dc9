"""Command-line front end of the training stage: parse, validate, run, and turn user mistakes into
one clear line and an exit code instead of a traceback."""

from __future__ import annotations

import sys

from .checkpoints import ResumeError
from .config import ConfigError, config_from_args
from .data import DataError

EXIT_USAGE = 2  # bad flags, bad config, impossible resume
EXIT_DATA = 1  # the dataset is unusable


def main(argv: list[str] | None = None) -> int:
    try:
        config = config_from_args(argv)
    except ConfigError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    from .trainer import run  # heavy imports only once the config is known to be good

    try:
        run(config)
    except ConfigError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except ResumeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DATA
    except KeyboardInterrupt:
        print(f"\ninterrupted: rerun the same command to continue from the newest checkpoint in "
              f"{config.output_dir}", file=sys.stderr)
        return 130
    return 0
