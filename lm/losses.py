"""The loss a language model trains on: summed cross-entropy over the labelled positions, with the
vocabulary head run on those positions alone where the architecture allows it (`TokenLoss`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lm.data import IGNORE
from lm.documents import attention_inputs


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
    split forward still goes through them. The attention mask (B, T) is 0 on padding and 1 on
    tokens, or numbers the texts of a row (--document-boundaries): then hidden_states and
    labelled_logits keep those texts apart (lm.documents), for subclasses too.
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
        return body(input_ids=input_ids, **attention_inputs(self.model, input_ids, attention_mask)).last_hidden_state

    def labelled_logits(self, input_ids, attention_mask, keep) -> torch.Tensor:
        """(N, V) logits of the positions where `keep` (B, T) is set; the head runs on those alone if it can."""
        if self.split is not None:
            return getattr(self.model, self.split[1])(self.hidden_states(input_ids, attention_mask)[keep])
        return self.model(input_ids=input_ids, **attention_inputs(self.model, input_ids, attention_mask)).logits[keep]


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
        ctx.spent = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # The gradients are scaled in place (a second (V, H) weight gradient would raise the step's
        # peak memory), so they serve one backward: a second would scale them twice.
        if ctx.spent:
            raise RuntimeError("LinearCrossEntropy: a second backward through the same forward "
                               "(its gradients were made in the forward and used up); run the forward again")
        ctx.spent = True
        grads = [g.mul_(grad_loss) if g is not None else None for g in ctx.saved_tensors]
        return (*grads, None, None)
