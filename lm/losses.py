"""The loss a language model trains on: summed cross-entropy over the labelled positions, with the
vocabulary head run on those positions alone where the architecture allows it (`TokenLoss`)."""

from __future__ import annotations

import math

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
        self.workspace = Workspace()  # the fused head's scratch tensors, kept between steps
        # whether attention masks may number texts (--document-boundaries): the loop sets it, so that
        # without the option no step looks at the mask's values (a sync, and a break in compiled graphs)
        self.texts = True

    def forward(self, input_ids, attention_mask, labels):
        keep = labels != IGNORE  # (B, T)
        if self.split is None:
            logits = self.labelled_logits(input_ids, attention_mask, keep)
        else:
            hidden, head = self.hidden_states(input_ids, attention_mask), getattr(self.model, self.split[1])
            if chunkable(head):
                dtype = (torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type)
                         else head.weight.dtype)
                # scratch tensors kept only on a CPU: a GPU's caching allocator reuses its memory anyway
                workspace = self.workspace if hidden.device.type == "cpu" else None
                return fused_head_loss(hidden[keep], head.weight, head.bias, labels[keep], dtype, workspace)
            logits = head(hidden[keep])
        # fp32 loss whatever the autocast dtype: log-softmax over ~50k logits loses digits in bf16
        return F.cross_entropy(logits.float(), labels[keep], reduction="sum")

    def hidden_states(self, input_ids, attention_mask) -> torch.Tensor:
        """(B, T, H) states the vocabulary head reads (split models only)."""
        body = getattr(self.model, self.split[0])
        return body(input_ids=input_ids, **self.inputs(input_ids, attention_mask)).last_hidden_state

    def labelled_logits(self, input_ids, attention_mask, keep) -> torch.Tensor:
        """(N, V) logits of the positions where `keep` (B, T) is set; the head runs on those alone if it can."""
        if self.split is not None:
            return getattr(self.model, self.split[1])(self.hidden_states(input_ids, attention_mask)[keep])
        return self.model(input_ids=input_ids, **self.inputs(input_ids, attention_mask)).logits[keep]

    def inputs(self, input_ids, attention_mask) -> dict:
        """The keyword arguments of a forward: the attention's (lm.documents), and no key/value cache where the
        model would make one (a training step never reads it back; kept, it costs memory, and its per-layer
        state makes a compiled layer recompile for each layer)."""
        inputs = attention_inputs(self.model, input_ids, attention_mask, self.texts)
        if getattr(self.model.config, "use_cache", False):
            inputs["use_cache"] = False
        return inputs


# Rows of logits per chunk: ~32 MB of fp32 logits at a time, whatever the vocabulary.
CHUNK_LOGITS = 2 ** 23


def chunkable(head: nn.Module) -> bool:
    """Whether the fused head + loss applies: a plain linear head, in training (the head itself may be frozen,
    as under LoRA: then only the hidden states get gradients)."""
    return isinstance(head, nn.Linear) and torch.is_grad_enabled()


class Workspace:
    """Scratch tensors kept from one call to the next, by name, grown when too small.

    The fused head's temporaries are large (a low-precision copy of the head, chunks of logits,
    (N, V) gradients of the logits): allocated afresh at every step, a CPU pays for their pages
    again each time (the allocator returns blocks this large to the system), ~20 ms per 100 MB,
    which is more than the arithmetic on them. Only what lives within one call goes here.
    """

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            buffer = self.buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


@torch.compiler.disable
def fused_head_loss(hidden, weight, bias, labels, dtype, workspace: Workspace | None = None) -> torch.Tensor:
    """LinearCrossEntropy, kept out of torch.compile's graphs (a graph break around it).

    Traced by Dynamo, its gradients (computed in the forward pass) came out as zeros on CUDA:
    compiled CLM runs did not learn. Eagerly, between compiled graphs, it behaves as without --compile.
    """
    return LinearCrossEntropy.apply(hidden, weight, bias, labels, dtype, workspace or Workspace())


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of a linear head, computed in row chunks with its gradients on the way.

    The plain path keeps (N, V) fp32 logits, their log-softmax for backward, and two more (N, V)
    buffers in backward: ~800 MB for a 49k vocabulary at 8 x 128 tokens. Here only one chunk of
    fp32 logits lives at a time, and its softmax is computed in place; the gradients w.r.t. hidden
    states, weight and bias are finished in the forward pass (softmax - one-hot is all the backward
    needs) and just scaled in backward. Matmuls run in `dtype` (bf16 under autocast, as the plain
    path would), the log-sum-exp in fp32. In fp32 the weight's gradient is summed chunk by chunk; in
    bf16 it is one matmul over all rows of (softmax - one-hot), kept in bf16 (N x V x 2 bytes),
    instead of a bf16 product per chunk added into fp32. Scratch tensors come from `workspace`.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, dtype, workspace):  # hidden (N, H), weight (V, H), labels (N,)
        n_rows, vocab, device = hidden.shape[0], weight.shape[0], hidden.device
        rows = max(1, min(n_rows, CHUNK_LOGITS // vocab))
        low = dtype != torch.float32  # bf16 matmuls, fp32 softmax
        trained = weight.requires_grad  # a frozen head (LoRA) needs no weight gradient: a third of the work
        with torch.autocast(device.type, enabled=False):
            h_all = hidden.to(dtype)
            w = weight if weight.dtype == dtype else workspace.get("weight", weight.shape, dtype, device).copy_(weight)
            b = bias.to(dtype) if bias is not None else None
            loss = torch.zeros((), dtype=torch.float32, device=device)
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros_like(weight) if trained and not low else None
            grad_bias = torch.zeros_like(bias) if bias is not None and bias.requires_grad else None
            # bf16 (softmax - one-hot): of all rows when the weight's gradient is one matmul over them, else a chunk's
            dlogits_low = workspace.get("dlogits", (n_rows if trained else rows, vocab), dtype, device) if low else None
            for start in range(0, n_rows, rows):
                h, y = h_all[start:start + rows], labels[start:start + rows]
                n = len(y)
                logits = workspace.get("logits", (rows, vocab), torch.float32, device)[:n]  # (n, V)
                if low:
                    product = workspace.get("product", (rows, vocab), dtype, device)[:n]
                    logits.copy_(torch.addmm(b, h, w.T, out=product) if b is not None else torch.mm(h, w.T, out=product))
                elif b is not None:
                    torch.addmm(b, h, w.T, out=logits)
                else:
                    torch.mm(h, w.T, out=logits)
                target = logits.gather(1, y[:, None])  # (n, 1)
                top = logits.amax(1, keepdim=True)
                total = logits.sub_(top).exp_().sum(1, keepdim=True)  # logits now exp(logits - top)
                loss += (top + total.log() - target).sum()
                dlogits = logits.div_(total)  # the softmax
                dlogits[torch.arange(n, device=device), y] -= 1
                if grad_bias is not None:
                    grad_bias += dlogits.sum(0)
                if low:
                    dlogits = dlogits_low[start:start + n] if trained else dlogits_low[:n]
                    grad_hidden[start:start + n] = dlogits.copy_(logits) @ w
                else:
                    torch.mm(dlogits, w, out=grad_hidden[start:start + n])
                    if trained:
                        grad_weight.addmm_(dlogits.T, h)
            if low and trained:
                grad_weight = (dlogits_low.T @ h_all).to(weight.dtype)  # (V, H)
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
        return (*grads, None, None, None)
