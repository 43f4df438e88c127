"""Skipping loss spikes (--skip-spikes Z): a step whose loss or gradient norm lies more than Z standard deviations
above the mean of the last applied steps is not applied, so the weights, the optimizer state and the schedule go on
as if it never ran. The detector's state is part of where a run stands (lm.checkpoint.Progress.spikes), so a resumed
run judges its steps exactly as the uninterrupted one would.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

WINDOW = 100  # applied steps a step is compared with
MIN_STEPS = 10  # steps judged only once the window holds this many: a z-score of fewer means little
MAX_IN_A_ROW = 10  # spikes one after another: the run has moved somewhere new, and skipping would never end


def z_score(window: list[float], value: float) -> float:
    """How many standard deviations `value` lies above the mean of `window`: 0 while the window holds fewer than
    MIN_STEPS values, inf for a value that is not finite (or above a window that never varied)."""
    if not math.isfinite(value):
        return math.inf
    if len(window) < MIN_STEPS:
        return 0.0
    mean = statistics.fmean(window)
    std = statistics.pstdev(window, mean)
    if std == 0:
        return math.inf if value > mean else 0.0
    return (value - mean) / std


@dataclass
class Spikes:
    """The losses and gradient norms of the last WINDOW applied steps, and the steps skipped."""

    losses: list[float] = field(default_factory=list)  # per token, of the whole step (all processes)
    grad_norms: list[float] = field(default_factory=list)  # before clipping
    skipped: int = 0  # steps not applied in the whole run
    in_a_row: int = 0  # of those, since the last applied step

    def judge(self, loss: float, grad_norm: float, limit: float) -> dict[str, float] | None:
        """The z-scores {'loss': z, 'grad_norm': z} of a step that is a spike, which is counted and left out of the
        window; None for a step to apply, whose values join the window."""
        scores = {"loss": z_score(self.losses, loss), "grad_norm": z_score(self.grad_norms, grad_norm)}
        if max(scores.values()) > limit:
            self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
            return scores
        self.losses, self.grad_norms = self.losses[-WINDOW + 1:] + [loss], self.grad_norms[-WINDOW + 1:] + [grad_norm]
        self.in_a_row = 0
        return None
