"""Per-layer statistics of an optimizer step (--log-layers): the gradient norm, the weight norm and the update/weight
ratio of the embeddings, of each transformer layer and of the head.

A logged step reads the gradients once and copies the trained weights once before the optimizer steps; the weight
norms come from that copy and the updates from it and the weights after the step, so any optimizer will do (none
has to say what update it made). Norms are sums of squares per part, added over processes in one all-reduce under
FSDP, where each process holds a shard of every weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lm.modeling import transformer_layers

STATS = ("grad_norm", "weight_norm", "update_ratio")


@dataclass(frozen=True)
class Parts:
    """The trained parameters of a model and the part each belongs to."""

    names: tuple[str, ...]  # "embeddings", "layer.0", "layer.1", ..., "head": those with trained parameters
    params: tuple[nn.Parameter, ...]
    index: torch.Tensor  # (P,) the position in `names` of each parameter's part


def model_parts(model: nn.Module) -> Parts:
    """The parts of `model` that train: its transformer layers (lm.modeling.transformer_layers), what comes before
    the first (embeddings) and what comes after (final norm, head), in the order of model.named_parameters().
    A head tied to the input embeddings is the embeddings' parameter."""
    layers = [f"{name}." for name, _ in transformer_layers(model)]
    width = len(str(len(layers) - 1))  # layer.07 sorts before layer.10 in TensorBoard
    names, params, parts, past_layers = [], [], [], False
    for name, p in model.named_parameters():
        layer = next((i for i, prefix in enumerate(layers) if name.startswith(prefix)), None)
        past_layers = past_layers or layer is not None
        if not p.requires_grad:
            continue
        part = f"layer.{layer:0{width}d}" if layer is not None else "head" if past_layers else "embeddings"
        if part not in names:
            names.append(part)
        params.append(p)
        parts.append(names.index(part))
    device = params[0].device if params else torch.device("cpu")
    return Parts(tuple(names), tuple(params), torch.tensor(parts, dtype=torch.long, device=device))


@dataclass
class Before:
    """What a logged step keeps from before the optimizer step."""

    grads: torch.Tensor  # (parts,) sums of squares of this process's gradients
    weights: torch.Tensor  # (parts,) sums of squares of this process's weights
    copy: list[torch.Tensor]  # the weights (this process's shards)


def before_step(parts: Parts) -> Before:
    """Read the gradients and copy the weights: call after backward, before the optimizer (and clipping) runs."""
    grads = [local(p.grad) if p.grad is not None else None for p in parts.params]
    with_grad = [i for i, g in enumerate(grads) if g is not None]
    copy = [local(p).detach().clone() for p in parts.params]
    return Before(part_sums(parts, [grads[i] for i in with_grad], with_grad), part_sums(parts, copy), copy)


def after_step(parts: Parts, before: Before, sharded: bool = False) -> dict[str, dict[str, float]]:
    """{stat: {part: value}} once the optimizer has stepped: the gradient norm and weight norm from before the step,
    and the norm of the step's change of the weights over the weight norm. `sharded`: under FSDP (a collective)."""
    torch._foreach_sub_(before.copy, [local(p).detach() for p in parts.params])  # the copy becomes old - new
    sums = torch.stack([before.grads, before.weights, part_sums(parts, before.copy)])  # (3, parts)
    if sharded:
        dist.all_reduce(sums)
    grads, weights, updates = sums.sqrt().tolist()
    ratios = [u / w if w > 0 else float("nan") for u, w in zip(updates, weights)]
    return {stat: dict(zip(parts.names, values)) for stat, values in zip(STATS, (grads, weights, ratios))}


def part_sums(parts: Parts, tensors: list[torch.Tensor], which: list[int] | None = None) -> torch.Tensor:
    """(parts,) fp32 sums of squares of `tensors`, those of parameters `which` (default: all, in order)."""
    sums = torch.zeros(len(parts.names), dtype=torch.float32, device=parts.index.device)
    if tensors:
        # one kernel per dtype and device, as clip_grad_norm_ computes its norms
        squares = torch.stack([n.float() for n in torch._foreach_norm(tensors)]).square()
        index = parts.index if which is None else parts.index[which]
        sums.index_add_(0, index, squares.to(sums.device))
    return sums


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: an FSDP-sharded DTensor's shard, else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
