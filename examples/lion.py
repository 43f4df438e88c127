"""Causal LM trained with Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): each step moves
every weight by lr x the sign of an interpolated momentum. Plugged in through train()'s optimizer seam, no change
under lm/: checkpoints, exact resume, torchrun and the schedule come with it.

python examples/lion.py --lr 3e-4 --weight-decay 0.1   (the flags of train_clm.py; see --help)

Lion's steps are all of size lr, so it wants ~3-10x AdamW's learning rate lower and its weight decay that much
higher.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing lm

import torch

from lm.cli import main
from lm.objectives import CLM

BETAS = (0.9, 0.99)  # the paper's: the update interpolates with beta1, the momentum decays with beta2


class Lion(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = BETAS, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                momentum = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled, as AdamW's
                p.add_(torch.sign(momentum.lerp(p.grad, 1 - beta1)), alpha=-group["lr"])
                momentum.lerp_(p.grad, 1 - beta2)


def lion(param_groups: list[dict], cfg) -> Lion:
    """The optimizer factory train() takes: lm's parameter groups (their lr, base_lr and weight_decay set) and the
    run's config. torch keeps the groups' other keys (names, hidden) as they are."""
    return Lion(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


if __name__ == "__main__":
    sys.exit(main(CLM, optimizer=lion))
