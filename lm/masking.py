"""Dynamic masking for masked LM: a pure function of (ids, generator), and the collator that seeds it."""

from __future__ import annotations

import numpy as np
import torch

from lm.data import IGNORE, pad_batch


def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, mlm_prob: float, mask_token_id: int,
                vocab_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick `mlm_prob` of the maskable positions; of those 80% -> mask token, 10% -> random, 10% kept.

    Returns (inputs, labels): labels hold the original id at picked positions and IGNORE elsewhere.
    """
    picked = (torch.rand(input_ids.shape, generator=generator) < mlm_prob) & maskable
    labels = torch.where(picked, input_ids, IGNORE)
    fate = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)
    inputs = torch.where(picked & (fate < 0.8), mask_token_id, input_ids)
    inputs = torch.where(picked & (fate >= 0.8) & (fate < 0.9), random_ids, inputs)
    return inputs, labels


def example_generator(seed: int, stream: int, epoch: int, index: int) -> torch.Generator:
    """A generator owned by one example in one epoch: its mask doesn't depend on batching or ranks."""
    state = np.random.SeedSequence([seed, stream, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# Evaluation's masks are drawn from this seed whatever --seed is (the default --seed's): one validation set for every
# run, so that perplexities of runs with other seeds, and --eval-only of their models, compare.
EVALUATION_SEED = 42


class MaskingCollator:
    """Pads a batch and masks it afresh for each (epoch, example): the same masks on every rerun.

    Training draws from stream 0 with the current epoch and `seed`; evaluation uses stream 1, a fixed epoch and
    EVALUATION_SEED, so every evaluation sees identical masks and perplexities are comparable across steps and runs.
    Another masking scheme overrides `mask`, which sees one example's real tokens.
    """

    def __init__(self, tokenizer, mlm_prob: float, seed: int, evaluation: bool = False):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.mask_id = tokenizer.mask_token_id
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.vocab_size = len(tokenizer)
        self.mlm_prob, self.seed = mlm_prob, EVALUATION_SEED if evaluation else seed
        self.stream = 1 if evaluation else 0

    def __call__(self, items, epoch: int = 0) -> dict:
        batch = pad_batch(items, self.pad_id)
        inputs, labels = batch["input_ids"].clone(), torch.full_like(batch["input_ids"], IGNORE)
        for row, (index, ids, *_) in enumerate(items):  # (index, ids) or (index, ids, texts)
            # the real tokens only: the padding a batch adds must not shift the random numbers
            generator = example_generator(self.seed, self.stream, epoch, index)
            inputs[row, :len(ids)], labels[row, :len(ids)] = self.mask(ids, generator)
        batch["input_ids"], batch["labels"] = inputs, labels
        return batch

    def mask(self, ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of one example's (T,) ids: tokens picked one by one, never special ones."""
        maskable = ~torch.isin(ids, self.special_ids)
        return mask_tokens(ids, maskable, self.mlm_prob, self.mask_id, self.vocab_size, generator)

