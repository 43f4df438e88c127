"""The command line: parse, train, and turn a UsageError into one line on stderr with exit code 2."""

from __future__ import annotations

import os
import sys

from lm.errors import UsageError


def main(task, argv=None) -> int:
    """Run a task (an Objective or its name) from the command line; returns the exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # quiet fork warnings from DataLoader
    from lm import distributed
    from lm.config import find_objective, parse_args

    try:
        cfg = parse_args(task, argv)
        from lm.train import train

        train(cfg, objective=find_objective(task))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0
