"""The command line: parse, train, and turn a UsageError into one line on stderr with exit code 2."""

from __future__ import annotations

import os
import signal
import sys

from lm.errors import UsageError


def main(task, argv=None, *, optimizer=None) -> int:
    """Run a task (an Objective or its name) from the command line; returns the exit code. `optimizer`, if given,
    builds the optimizer (see lm.train.train)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # quiet fork warnings from DataLoader
    from lm.config import find_objective, parse_args

    try:
        cfg = parse_args(task, argv)  # torch-free: --help and a mistyped flag answer before torch loads
    except UsageError as e:
        return fail(e)
    from lm import distributed
    from lm.train import train

    try:
        train(cfg, objective=find_objective(task), optimizer=optimizer)
    except UsageError as e:
        code = fail(e)
        if isinstance(e, distributed.EveryRankError):
            distributed.leave_together(code)
        return code
    finally:
        distributed.shutdown()
    return 0


def fail(error: UsageError) -> int:
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # torchrun stops the other ranks with SIGTERM once one exits; this one is on its way out with the
        # error's own exit code, which the signal would replace
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # one write: stderr writes through, so print's two (the text, then its newline) let another rank's error line
    # land between them on the pipe torchrun's ranks share
    sys.stderr.write(f"error: {error}\n")
    sys.stderr.flush()
    return 2
