"""What differs between training objectives, one `Objective` record each: CLM and MLM here, more in
examples/. The rest of lm/ asks the objective and never compares task names.

No torch here: the command line reads the records (names, defaults, checks) before anything heavy is
imported, so `--help` and usage errors answer at once. The built-in records name their collators and
loss through small functions that import them when a run builds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from lm import embedded
from lm.errors import UsageError


@dataclass(frozen=True)
class Objective:
    """Everything a training objective decides. A new one is an instance of this (often
    `dataclasses.replace(CLM, ...)`) given to `lm.cli.main` or `lm.train.train`: it gets the whole CLI,
    checkpoints, resume, torchrun, TensorBoard and metrics."""

    name: str  # the task's name: checked on resume, names default output dirs
    description: str  # what it trains, for --help: "Fine-tune a <description>."
    model_class: str  # the transformers Auto class that loads the model
    embedded_model: str  # the offline default model (lm.embedded)
    collator: Callable  # (tokenizer, cfg, evaluation) -> collate(items, epoch): a padded batch with "labels"
    loss: Callable  # (model) -> module: forward(input_ids, attention_mask, labels) -> summed loss (loss_and_logs)
    defaults: dict = field(default_factory=dict)  # option defaults of its script
    check: Callable | None = None  # (cfg): raise UsageError for settings it can't train with; no model loaded yet
    check_tokenizer: Callable | None = None  # (tokenizer): the same, once the tokenizer is loaded
    adapt: Callable | None = None  # (model, tokenizer): changes before training, e.g. new tokens
    # whether its collator labels only the tokens whose loss mask is 1 (items that carry one: conversations)
    loss_mask: bool = False

    def __post_init__(self):
        # so a checkpoint's or a config's task name finds it; the latest definition of a name wins (a
        # script imported twice), but the built-in names stay theirs
        if self.name not in _BUILT_IN:
            _REGISTRY[self.name] = self
        elif _REGISTRY[self.name] != self:
            raise ValueError(f"{self.name!r} is a built-in objective: give this one its own name")


_REGISTRY: dict[str, Objective] = {}
_BUILT_IN: set[str] = set()  # filled once CLM and MLM exist


def find(name: str) -> Objective:
    """The objective called `name` (the built-in ones, and any defined since)."""
    if name not in _REGISTRY:
        raise UsageError(f"unknown task {name!r}: use one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def causal_batches(tokenizer, cfg, evaluation: bool):
    """CLM's collator: padded blocks, each position labelled with the next token (lm.data.CausalCollator)."""
    from lm.data import CausalCollator

    return CausalCollator(tokenizer, cfg, evaluation)


def masked_batches(tokenizer, cfg, evaluation: bool):
    """MLM's collator: padded blocks masked afresh per (seed, epoch, example) (lm.masking.MaskingCollator)."""
    from lm.masking import MaskingCollator

    return MaskingCollator(tokenizer, cfg.mlm_prob, cfg.seed, evaluation)


def token_loss(model):
    """Summed cross-entropy over labelled positions, the head run on those alone (lm.losses.TokenLoss)."""
    from lm.losses import TokenLoss

    return TokenLoss(model)


def _causal_blocks(cfg) -> None:
    if cfg.line_by_line:
        raise UsageError("--line-by-line is for masked LM only: causal LM trains on concatenated blocks")
    if cfg.block_size == 1:  # its one token has no next token in the block: no loss, a NaN perplexity
        raise UsageError("--block-size 1 leaves a causal LM nothing to predict; use 2 or more")


def _causal_options(cfg) -> None:
    if cfg.eval_stride:
        raise UsageError("--eval-stride is for causal LM only: a masked LM sees the whole block in both directions")
    if cfg.sample_every:
        raise UsageError("--sample-every is for causal LM only: a masked LM fills in masks, it doesn't continue a text")


def needs_mask_token(tokenizer) -> None:
    if tokenizer.mask_token_id is None:
        raise UsageError(f"the tokenizer {tokenizer.name_or_path} has no mask token, so it can't do masked LM; "
                         "use an encoder's, such as distilroberta-base's or the default's")


# Half an epoch of the embedded corpus keeps the CLM quick start near 10 minutes on 2 CPU cores
# (SmolLM2-135M: ~11 s per fp32 step of 8 x 128 tokens). The MLM head of the embedded MiniLM is absent
# from its checkpoint, so it starts random and needs a far larger step size than the pretrained body.
CLM = Objective("clm", "causal language model", "AutoModelForCausalLM", embedded.SMOLLM2, causal_batches,
                token_loss, defaults=dict(epochs=0.5), check=_causal_blocks, loss_mask=True)
MLM = Objective("mlm", "masked language model", "AutoModelForMaskedLM", embedded.MINILM, masked_batches,
                token_loss, defaults=dict(lr=1e-4, head_lr=1e-3, epochs=3.0), check=_causal_options,
                check_tokenizer=needs_mask_token)
_BUILT_IN.update((CLM.name, MLM.name))
