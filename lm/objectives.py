"""The two objectives. They differ only in how labels are made; the loss over labelled positions is shared."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lm.data import IGNORE, pad_batch
from lm.masking import MaskingCollator

# Architectures whose vocabulary head is a module that maps hidden states to logits on its own,
# so it can run on the labelled positions only. Others go through the full forward.
SPLIT_HEAD = {
    "gpt2": "lm_head", "llama": "lm_head", "mistral": "lm_head", "qwen2": "lm_head", "qwen3": "lm_head",
    "bert": "cls", "roberta": "lm_head", "xlm-roberta": "lm_head", "camembert": "lm_head",
}


class CausalCollator:
    """Pads a batch; the labels are the next token of each position."""

    def __init__(self, tokenizer):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.epoch = 0  # unused: causal batches carry no randomness

    def __call__(self, items) -> dict:
        batch = pad_batch(items, self.pad_id)
        batch["labels"] = causal_labels(batch["input_ids"], batch["attention_mask"])
        return batch


def causal_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) labels where position t predicts token t+1; IGNORE after the last token and on padding."""
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = torch.where(attention_mask[:, 1:].bool(), input_ids[:, 1:], IGNORE)
    return labels


def make_collator(task: str, tokenizer, mlm_prob: float, seed: int, evaluation: bool = False):
    """The batch builder of a task: next-token labels for clm, fresh masks for mlm."""
    if task == "mlm":
        return MaskingCollator(tokenizer, mlm_prob, seed, evaluation=evaluation)
    return CausalCollator(tokenizer)


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
        if self.split is not None:
            body, head = (getattr(self.model, name) for name in self.split)
            hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
            if chunkable(head, hidden):
                return LinearCrossEntropy.apply(hidden[keep], head.weight, head.bias, labels[keep])
            logits = head(hidden[keep])  # (N, V)
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[keep]  # (N, V)
        # fp32 loss whatever the autocast dtype: log-softmax over ~50k logits loses digits in bf16
        return F.cross_entropy(logits.float(), labels[keep], reduction="sum")


# Rows of logits per chunk: ~32 MB of fp32 logits at a time, whatever the vocabulary.
CHUNK_LOGITS = 2 ** 23


def chunkable(head: nn.Module, hidden: torch.Tensor) -> bool:
    """Whether the fused head + loss applies: a plain linear head, gradients wanted, no autocast."""
    return (isinstance(head, nn.Linear) and torch.is_grad_enabled() and head.weight.requires_grad
            and not torch.is_autocast_enabled(hidden.device.type))


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of a linear head, computed in row chunks with its gradients on the way.

    The plain path keeps (N, V) fp32 logits, their log-softmax for backward, and two more (N, V)
    buffers in backward: ~800 MB for a 49k vocabulary at 8 x 128 tokens. Here only one chunk of
    logits lives at a time; the gradients w.r.t. hidden states, weight and bias are finished in the
    forward pass (softmax - one-hot is all the backward needs) and just scaled in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels):  # hidden (N, H), weight (V, H), labels (N,)
        rows = max(1, CHUNK_LOGITS // weight.shape[0])
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        grad_bias = torch.zeros_like(bias) if bias is not None else None
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start:start + rows], labels[start:start + rows]
            logits = F.linear(h, weight, bias).float()  # (n, V)
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
            loss += (lse.squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)).sum()
            dlogits = logits.sub_(lse).exp_()  # softmax, in place of the logits
            dlogits[torch.arange(len(y), device=y.device), y] -= 1
            grad_hidden[start:start + rows] = dlogits @ weight
            grad_weight.addmm_(dlogits.T, h)
            if grad_bias is not None:
                grad_bias += dlogits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (grad_hidden * grad_loss, grad_weight * grad_loss,
                grad_bias * grad_loss if grad_bias is not None else None, None)
