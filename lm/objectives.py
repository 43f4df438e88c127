"""What differs between training objectives, one `Objective` record each: CLM and MLM here, more in
examples/. The loss over labelled positions (`TokenLoss`) is shared; the rest of lm/ asks the objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lm import embedded
from lm.data import IGNORE, pad_batch
from lm.errors import UsageError
from lm.masking import MaskingCollator


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


class CausalCollator:
    """Pads a batch; the labels are the next token of each position. Causal batches carry no randomness."""

    def __init__(self, tokenizer, cfg=None, evaluation: bool = False):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __call__(self, items, epoch: int = 0) -> dict:
        batch = pad_batch(items, self.pad_id)
        batch["labels"] = causal_labels(batch["input_ids"], batch["attention_mask"])
        return batch


def causal_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) labels where position t predicts token t+1; IGNORE after the last token and on padding."""
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = torch.where(attention_mask[:, 1:].bool(), input_ids[:, 1:], IGNORE)
    return labels


def _blocks_only(cfg) -> None:
    if cfg.line_by_line:
        raise UsageError("--line-by-line is for masked LM only: causal LM trains on concatenated blocks")


def needs_mask_token(tokenizer) -> None:
    if tokenizer.mask_token_id is None:
        raise UsageError(f"--model {tokenizer.name_or_path}: its tokenizer has no mask token, so it can't do masked "
                         "LM; use an encoder such as distilroberta-base or the default")


def loss_and_logs(output) -> tuple[torch.Tensor, dict]:
    """A loss module's output split into the summed loss to minimise and the other summed values to log.

    A forward returns the loss, or a dict with "loss" and any other summed scalars (logged per token
    as train/<name>): the seam an objective uses to report, e.g., an auxiliary term.
    """
    if isinstance(output, dict):
        return output["loss"], {k: v for k, v in output.items() if k != "loss"}
    return output, {}


# Architectures whose vocabulary head is a module that maps hidden states to logits on its own,
# so it can run on the labelled positions only. Others go through the full forward.
SPLIT_HEAD = {
    "gpt2": "lm_head", "llama": "lm_head", "mistral": "lm_head", "qwen2": "lm_head", "qwen3": "lm_head",
    "bert": "cls", "roberta": "lm_head", "xlm-roberta": "lm_head", "camembert": "lm_head",
}


def split_head(model: nn.Module) -> tuple[str, str] | None:
    """(body attribute, head attribute) when the head can run on selected positions, else None."""
    head = SPLIT_HEAD.get(getattr(model.config, "model_type", None))
    if head is None or not hasattr(model, head):
        return None
    return model.base_model_prefix, head


class TokenLoss(nn.Module):
    """A language model whose forward returns the summed cross-entropy over labelled positions.

    The sum (not the mean) lets the loop normalise by the tokens of a whole optimizer step. The
    vocabulary head runs only where labels != IGNORE: for MLM that is ~15% of the positions, the
    same loss for a fraction of the head's cost. DDP and torch.compile wrap this module, so the
    split forward still goes through them.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.split = split_head(model)

    def forward(self, input_ids, attention_mask, labels):
        keep = labels != IGNORE  # (B, T)
        if self.split is not None and chunkable(getattr(self.model, self.split[1])):
            hidden, head = self.hidden_states(input_ids, attention_mask), getattr(self.model, self.split[1])
            dtype = (torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type)
                     else head.weight.dtype)
            return fused_head_loss(hidden[keep], head.weight, head.bias, labels[keep], dtype)
        # fp32 loss whatever the autocast dtype: log-softmax over ~50k logits loses digits in bf16
        return F.cross_entropy(self.labelled_logits(input_ids, attention_mask, keep).float(), labels[keep],
                               reduction="sum")

    def hidden_states(self, input_ids, attention_mask) -> torch.Tensor:
        """(B, T, H) states the vocabulary head reads (split models only)."""
        body = getattr(self.model, self.split[0])
        return body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def labelled_logits(self, input_ids, attention_mask, keep) -> torch.Tensor:
        """(N, V) logits of the positions where `keep` (B, T) is set; the head runs on those alone if it can."""
        if self.split is not None:
            return getattr(self.model, self.split[1])(self.hidden_states(input_ids, attention_mask)[keep])
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[keep]


# Rows of logits per chunk: ~32 MB of fp32 logits at a time, whatever the vocabulary.
CHUNK_LOGITS = 2 ** 23


def chunkable(head: nn.Module) -> bool:
    """Whether the fused head + loss applies: a plain linear head whose gradients are wanted."""
    return isinstance(head, nn.Linear) and torch.is_grad_enabled() and head.weight.requires_grad


@torch.compiler.disable
def fused_head_loss(hidden, weight, bias, labels, dtype) -> torch.Tensor:
    """LinearCrossEntropy, kept out of torch.compile's graphs (a graph break around it).

    Traced by Dynamo, its gradients (computed in the forward pass) came out as zeros on CUDA:
    compiled CLM runs did not learn. Eagerly, between compiled graphs, it behaves as without --compile.
    """
    return LinearCrossEntropy.apply(hidden, weight, bias, labels, dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of a linear head, computed in row chunks with its gradients on the way.

    The plain path keeps (N, V) fp32 logits, their log-softmax for backward, and two more (N, V)
    buffers in backward: ~800 MB for a 49k vocabulary at 8 x 128 tokens. Here only one chunk of
    fp32 logits lives at a time; the gradients w.r.t. hidden states, weight and bias are finished in
    the forward pass (softmax - one-hot is all the backward needs) and just scaled in backward.
    Matmuls run in `dtype` (bf16 under autocast, as the plain path would), the log-sum-exp in fp32.
    In bf16 the weight's gradient is one matmul over all rows of (softmax - one-hot), kept in bf16
    (N x V x 2 bytes), instead of a bf16 product per chunk added into fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, dtype):  # hidden (N, H), weight (V, H), labels (N,)
        rows = max(1, CHUNK_LOGITS // weight.shape[0])
        exact = dtype == weight.dtype  # fp32: accumulate the weight's gradient chunk by chunk, in place
        with torch.autocast(hidden.device.type, enabled=False):
            h_all = hidden.to(dtype)
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros_like(weight) if exact else None
            grad_bias = torch.zeros_like(bias) if bias is not None else None
            dlogits_all = None if exact else torch.empty(len(labels), weight.shape[0], dtype=dtype, device=hidden.device)
            for start in range(0, h_all.shape[0], rows):
                h, y = h_all[start:start + rows], labels[start:start + rows]
                logits = F.linear(h, w, b).float()  # (n, V)
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
                loss += (lse.squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)).sum()
                dlogits = logits.sub_(lse).exp_()  # softmax, in place of the logits
                dlogits[torch.arange(len(y), device=y.device), y] -= 1
                if grad_bias is not None:
                    grad_bias += dlogits.sum(0)
                if exact:
                    grad_hidden[start:start + rows] = dlogits @ w
                    grad_weight.addmm_(dlogits.T, h)
                else:
                    dlogits_all[start:start + rows] = dlogits
                    grad_hidden[start:start + rows] = dlogits_all[start:start + rows] @ w
            if not exact:
                grad_weight = (dlogits_all.T @ h_all).to(weight.dtype)  # (V, H)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # scaled in place: a second (V, H) weight gradient would raise the step's peak memory
        grads = [g.mul_(grad_loss) if g is not None else None for g in ctx.saved_tensors]
        return (*grads, None, None)


# Half an epoch of the embedded corpus keeps the CLM quick start near 10 minutes on 2 CPU cores
# (SmolLM2-135M: ~11 s per fp32 step of 8 x 128 tokens). The MLM head of the embedded MiniLM is absent
# from its checkpoint, so it starts random and needs a far larger step size than the pretrained body.
CLM = Objective("clm", "causal language model", "AutoModelForCausalLM", embedded.SMOLLM2, CausalCollator, TokenLoss,
                defaults=dict(epochs=0.5), check=_blocks_only)
MLM = Objective("mlm", "masked language model", "AutoModelForMaskedLM", embedded.MINILM,
                lambda tokenizer, cfg, evaluation: MaskingCollator(tokenizer, cfg.mlm_prob, cfg.seed, evaluation),
                TokenLoss, defaults=dict(lr=1e-4, head_lr=1e-3, epochs=3.0), check_tokenizer=needs_mask_token)
_BUILT_IN.update((CLM.name, MLM.name))
