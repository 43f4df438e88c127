"""torchrun support: who am I, which device, and the few collectives the loop needs.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them a run is a single process and every
helper here is a no-op, so the loop reads the same either way.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from lm.errors import UsageError
from lm.modeling import transformer_layers
from lm.optim import optimizers


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes logs, checkpoints, progress bars and the saved model."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init(device: torch.device, timeout: float = 1800) -> tuple[World, torch.device]:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); pin one GPU per process.

    `timeout` (seconds) bounds every wait for the other processes, e.g. while rank 0 tokenizes.
    """
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World(), device
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout),
                                device_id=device if device.type == "cuda" else None)
    return world, device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_sum(world: World, *values: float, device: torch.device | None = None) -> list[float]:
    """Sum a few numbers over all ranks in one collective (float64 so token counts stay exact)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_to_main(world: World, obj):
    """Every rank's `obj` as a list on rank 0 (None elsewhere); [obj] in a single process."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size if world.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(world: World, obj):
    """Rank 0's `obj` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class EveryRankError(UsageError):
    """A UsageError that every rank raises at the same point of the run: the ranks leave together (leave_together)."""


def leave_together(code: int) -> None:
    """End this rank, stopped by an EveryRankError, once every rank has said the error (and so ignores the SIGTERM
    torchrun sends the others when one exits): a rank leaving first would have torchrun stop one still on its way
    to its error line. Then at once: the usual exit sometimes aborted in torch's C++ teardown (SIGABRT, "terminate
    called without an active exception"), which torchrun reports instead of `code`. A single process returns."""
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_on_main(world: World, fn, send_result: bool = True):
    """fn() on rank 0 while the others wait; rank 0's result on every rank (or None there without
    `send_result`). A UsageError raised by fn reaches every rank, so all stop alike and none waits forever."""
    if not world.distributed:
        return fn()
    result, error = None, None
    if world.main:
        try:
            result = fn()
        except UsageError as e:
            error = str(e)
    result, error = broadcast_from_main(world, (result if send_result else None, error))
    if error is not None:
        raise EveryRankError(error)
    return result if send_result or world.main else None


def launcher() -> list[str]:
    """How this process was started, without the script and its arguments: python, or torchrun and its flags."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return ["python"]
    try:  # the torchrun agent is our parent; its command line holds the flags the user gave it
        parent = open(f"/proc/{os.getppid()}/cmdline", "rb").read().decode().split("\0")
        return ["torchrun", *parent[parent.index(next(a for a in parent if a.endswith("run"))) + 1:
                                    parent.index(sys.argv[0])]]
    except (OSError, ValueError, StopIteration):
        nodes = int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"])
        return ["torchrun", "--nnodes", str(nodes), "--nproc-per-node", os.environ["LOCAL_WORLD_SIZE"]]


def shard(module: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: each transformer block its own shard group, the loss module (holding the rest) the root.

    Blocks are lm.modeling.transformer_layers. A block that holds a parameter tied elsewhere stays in the root
    group, where both users see it unsharded.
    """
    from torch.distributed.fsdp import fully_shard

    uses = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for _, block in transformer_layers(model):
        if all(uses[id(p)] == 1 for p in block.parameters()):
            fully_shard(block)
    fully_shard(module)
    return module


def full_state(model: torch.nn.Module, optimizer=None, sharded: bool = False):
    """(model state, optimizer state) as whole tensors on CPU; under FSDP gathered on rank 0 (a collective)."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = (get_optimizer_state_dict(model, optimizers(optimizer), options=options) if optimizer is not None
                   else None)
    return model_state, optim_state


def load_full_state(model: torch.nn.Module, optimizer, model_state, optim_state, sharded: bool = False,
                    strict: bool = True) -> None:
    """Inverse of full_state: under FSDP rank 0's whole tensors are scattered to the shards. Not `strict`: the
    model state holds some of the model's tensors (LoRA: what trains)."""
    if not sharded:
        model.load_state_dict(model_state, strict=strict)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
        set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizers(optimizer), optim_state, options=options)


def no_sync(trained, world: World, fsdp: bool, sync: bool):
    """Skip the gradient reduction of an accumulation micro-step (DDP's no_sync, FSDP2's flag)."""
    if fsdp:
        trained.set_requires_gradient_sync(sync)
    elif world.distributed and not sync:
        return trained.no_sync()
    return contextlib.nullcontext()
