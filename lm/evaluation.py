"""Evaluation: the token-weighted loss over a whole split, on all ranks, and its perplexity."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from lm import distributed
from lm.checkpoint import Stopped
from lm.data import IGNORE
from lm.hardware import autocast
from lm.losses import loss_and_logs


@torch.no_grad()
def evaluate(module, loader, device, precision: str, world=distributed.World(), stop=None) -> float:
    """Mean loss per labelled token over the whole split, on all ranks (token-weighted, not a mean of means).

    `stop`, if given, is asked before each batch (by every rank alike): when it answers yes, the evaluation
    ends with checkpoint.Stopped. A batch may be None: this rank has none there, while others do."""
    was_training = module.training
    module.eval()
    loss_sum, tokens = 0.0, 0
    with tqdm(loader, desc="evaluating", unit="batch", leave=False, dynamic_ncols=True, disable=not world.main) as bar:
        for batch in bar:
            if stop is not None and stop():
                module.train(was_training)
                raise Stopped
            if batch is None:
                continue
            labels = batch["labels"].to(device)
            with autocast(device, precision):
                output = module(batch["input_ids"].to(device), batch["attention_mask"].to(device), labels)
            loss_sum += loss_and_logs(output)[0].item()
            tokens += int((labels != IGNORE).sum())
    module.train(was_training)
    loss_sum, tokens = distributed.all_sum(world, loss_sum, tokens, device=device)
    return loss_sum / tokens if tokens else float("nan")  # nothing to predict: no perplexity, not 1.0


def perplexity(loss: float) -> float:
    """exp(loss), saturating at inf instead of raising on overflow."""
    return math.exp(loss) if not loss >= 700 else float("inf")  # nan stays nan
