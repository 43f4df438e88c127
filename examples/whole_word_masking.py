"""Whole-word masking: masked LM where every sub-token of a picked word is masked together (BERT-wwm).

python examples/whole_word_masking.py --mlm-prob 0.15   (the flags of train_mlm.py; see --help)
"""

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing lm

import torch

from lm.cli import main
from lm.masking import MaskingCollator, mask_tokens
from lm.objectives import MLM

# Without a WordPiece prefix, a token that begins with whitespace starts a word: byte-level BPE's
# space, newline and tab markers, SentencePiece's space. Any other token continues the word before it.
WORD_START = ("Ġ", "Ċ", "ĉ", "▁")


def continues_word(tokenizer) -> torch.Tensor:
    """(V,) bool: whether each token continues the previous token's word."""
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    prefix = getattr(model, "continuing_subword_prefix", None)  # "##" for WordPiece, empty for BPE
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if prefix:
        return torch.tensor([t.startswith(prefix) for t in tokens])
    return torch.tensor([not t.startswith(WORD_START) for t in tokens])


def pick_words(ids, maskable, continues, prob: float, generator) -> torch.Tensor:
    """(T,) bool: the tokens of the words picked, each word with probability `prob`.

    One draw per word, not a quota of tokens (HF's collator), keeps every maskable token's chance at
    exactly `prob` whatever its word's length, as mask_tokens does per token.
    """
    follows = torch.zeros_like(maskable)
    follows[1:] = maskable[1:] & maskable[:-1] & continues[ids[1:]]  # a special token ends a word
    position = torch.arange(len(ids))
    first = torch.cummax(torch.where(follows, 0, position), 0).values  # (T,) where each token's word starts
    return (torch.rand(len(ids), generator=generator) < prob)[first] & maskable


class WholeWordCollator(MaskingCollator):
    """Pads a batch and masks whole words, afresh for each (epoch, example), as MaskingCollator masks tokens."""

    def __init__(self, tokenizer, cfg, evaluation: bool = False):
        super().__init__(tokenizer, cfg.mlm_prob, cfg.seed, evaluation)
        self.continues = continues_word(tokenizer)

    def mask(self, ids, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of one example."""
        maskable = ~torch.isin(ids, self.special_ids)
        picked = pick_words(ids, maskable, self.continues, self.mlm_prob, generator)
        # the 80% [MASK] / 10% random / 10% kept choice stays per token, as in Google's BERT-wwm and HF's collator
        return mask_tokens(ids, picked, 1.0, self.mask_id, self.vocab_size, generator)


WWM = dataclasses.replace(MLM, name="wwm", description="masked language model with whole-word masking",
                          collator=WholeWordCollator)

if __name__ == "__main__":
    sys.exit(main(WWM))
