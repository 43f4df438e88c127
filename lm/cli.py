"""The command line: parse, train, and turn a UsageError into one line on stderr with exit code 2."""

from __future__ import annotations

import os
import sys

from lm.errors import UsageError


def main(task, argv=None) -> int:
    """Run a task (an Objective or its name) from the command line; returns the exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # quiet fork warnings from DataLoader
    from lm.config import find_objective, parse_args

    try:
        cfg = parse_args(task, argv)  # torch-free: --help and a mistyped flag answer before torch loads
    except UsageError as e:
        return fail(e)
    from lm import distributed
    from lm.train import train

    try:
        train(cfg, objective=find_objective(task))
    except UsageError as e:
        return fail(e)
    finally:
        distributed.shutdown()
    return 0


def fail(error: UsageError) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 2
