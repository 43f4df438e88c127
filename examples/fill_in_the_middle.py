"""Fill-in-the-middle: causal LM where FIM_RATE of the blocks are rearranged prefix-suffix-middle (PSM),
as code models are trained, so the model learns to write a middle given what surrounds it.

python examples/fill_in_the_middle.py --block-size 128   (the flags of train_clm.py; see --help)
"""

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing lm

import torch

from lm.cli import main
from lm.masking import EVALUATION_SEED, example_generator
from lm.data import CausalCollator
from lm.objectives import CLM

FIM_RATE = 0.5  # share of blocks rearranged; the others train left to right as plain CLM
FIM_TOKENS = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>")


def add_fim_tokens(model, tokenizer) -> None:
    """Give the tokenizer the FIM sentinels it lacks (SmolLM2's and MiniLM's have none) and the model rows for them."""
    missing = [t for t in FIM_TOKENS if t not in tokenizer.get_vocab()]  # convert_tokens_to_ids would give unk
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))


def rearrange(ids: torch.Tensor, sentinels: tuple[int, int, int], generator) -> torch.Tensor:
    """With probability FIM_RATE, <pre> prefix <suf> suffix <mid> middle; else `ids` as they are.

    The last 3 tokens make room for the sentinels, so the block keeps its length and no text inside
    it is lost; the two cut points are uniform over the remaining tokens, as in StarCoder's training.
    """
    if len(ids) <= len(sentinels) or torch.rand((), generator=generator) >= FIM_RATE:
        return ids
    text = ids[:-len(sentinels)]
    cut, end = torch.randint(len(text) + 1, (2,), generator=generator).sort().values.tolist()
    pre, mid, suf = (torch.tensor([s], dtype=ids.dtype) for s in sentinels)
    return torch.cat([pre, text[:cut], suf, text[end:], mid, text[cut:end]])


class FimCollator(CausalCollator):
    """Rearranges blocks by (seed, epoch, example), then pads them and labels each position with the next token.

    With --document-boundaries each text of a block is rearranged on its own: it keeps its length, so
    the texts stay where the block's `texts` says they are.
    """

    def __init__(self, tokenizer, cfg, evaluation: bool = False):
        super().__init__(tokenizer)
        vocab = tokenizer.get_vocab()  # after adapt: the sentinels are there
        self.sentinels = tuple(vocab[t] for t in FIM_TOKENS)
        # evaluation: the same blocks rearranged every time, in every run
        self.seed, self.stream = (EVALUATION_SEED, 1) if evaluation else (cfg.seed, 0)

    def __call__(self, items, epoch: int = 0) -> dict:
        rearranged = []
        for index, ids, *texts in items:  # (index, ids) or, with --document-boundaries, (index, ids, texts)
            generator = example_generator(self.seed, self.stream, epoch, index)
            pieces = ids.split(texts[0].unique_consecutive(return_counts=True)[1].tolist()) if texts else [ids]
            rearranged.append((index, torch.cat([rearrange(p, self.sentinels, generator) for p in pieces]), *texts))
        return super().__call__(rearranged, epoch)


FIM = dataclasses.replace(CLM, name="fim", description="causal language model with fill-in-the-middle",
                          collator=FimCollator, adapt=add_fim_tokens)

if __name__ == "__main__":
    sys.exit(main(FIM))
