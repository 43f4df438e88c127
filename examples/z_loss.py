"""Causal LM with PaLM's auxiliary z-loss, Z_WEIGHT * log(Z)^2 per predicted token, which keeps the
softmax normaliser near 1 and the logits from drifting (a help in long bf16 runs).

python examples/z_loss.py --block-size 128   (the flags of train_clm.py; see --help)
"""

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing lm

import torch
import torch.nn.functional as F

from lm.cli import main
from lm.data import IGNORE
from lm.losses import TokenLoss
from lm.objectives import CLM

Z_WEIGHT = 1e-4  # PaLM's coefficient


class ZLoss(TokenLoss):
    """Summed cross-entropy plus the summed z-loss while training (logged as train/z_loss); cross-entropy in eval."""

    def forward(self, input_ids, attention_mask, labels):
        if not self.training:
            return super().forward(input_ids, attention_mask, labels)  # perplexity comparable with plain CLM
        keep = labels != IGNORE  # (B, T)
        # log Z needs the logits themselves, so no fused head + loss here: (N, V) fp32 logits
        logits = self.labelled_logits(input_ids, attention_mask, keep).float()
        cross_entropy = F.cross_entropy(logits, labels[keep], reduction="sum")
        z_loss = Z_WEIGHT * torch.logsumexp(logits, dim=-1).square().sum()
        return {"loss": cross_entropy + z_loss, "z_loss": z_loss}


Z_LOSS = dataclasses.replace(CLM, name="z-loss", description="causal language model with an auxiliary z-loss",
                             loss=ZLoss)

if __name__ == "__main__":
    sys.exit(main(Z_LOSS))
