"""The memory plan: before anything is loaded, the peak memory each process of a run will need, from the
model's config and the run's settings, against what the machine has free; and the peak a process really took.

What a forward keeps for backward is counted, not modelled: the model is built from its config on the meta
device (LoRA layers added by peft as a run adds them), its tensors are then swapped for fake ones (shapes
and dtypes, no memory: PyTorch's FakeTensorMode, as torch.compile traces), and one training forward runs
under the run's autocast while a saved-tensors hook adds up every tensor autograd keeps. So autocast's
casts, attention's probabilities, dropout's masks and the fused head's gradients are counted as this
torch and this transformers make them, for any architecture transformers builds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lm.errors import UsageError
from lm.modeling import meta_model

GIB = 2 ** 30
# What a CPU process allocates after the plan beyond the terms: the tokenizer and the tokenized data, oneDNN's
# kernels and scratch. Fitted with CPU_SLACK on the embedded defaults' 8 configurations (bench/memory_plan.py).
CPU_ALLOWANCE = int(0.15 * GIB)
# glibc's allocator leaves holes between the tensors a forward keeps (the short-lived ones freed around them):
# SmolLM2's bf16 forward raised the RSS by 1.99 GiB for 1.61 kept (full), by 1.69 for 1.06 (LoRA r16). On a
# CPU a plan adds this share of the activations to the baseline.
CPU_SLACK = 0.3
LORA_RANK = 16  # the rank a refusal suggests


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bytes one process will hold at its peak, by what holds them, and what it may use."""

    weights: int
    gradients: int
    optimizer: int
    activations: int  # what a training step's forward keeps for backward (autocast's weight casts included)
    head: int  # the fused vocabulary head's workspace and the gradients it keeps from forward to backward
    evaluation: int  # an evaluation batch's logits (with their fp32 copy and log-softmax) and one layer's work
    baseline: int  # the process itself on a CPU: Python, torch, transformers, the tokenizer, the data
    available: int
    # On a CPU the allocator keeps what a step's activations freed (small blocks stay with the process), and
    # an evaluation's logits (large blocks) are mapped afresh on top of it: measured so, after training.
    steps_stay: bool = False
    parameters: int = 0
    trainable: int = 0

    @property
    def step(self) -> int:
        """What a training step adds to what stays between steps."""
        return self.gradients + self.activations + self.head

    @property
    def after_steps(self) -> int:
        """What an evaluation adds to what stays between steps (on a CPU, over what the steps left)."""
        return self.evaluation + (self.activations + self.head if self.steps_stay else 0)

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.baseline + max(self.step, self.after_steps)

    @property
    def fits(self) -> bool:
        return self.total <= self.available

    def line(self) -> str:
        """memory: ~X GiB planned (weights A, ...) of Y GiB available."""
        terms = {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                 "activations": self.activations, "head": self.head}
        if self.step < self.after_steps:  # an evaluation sets the peak (--eval-only, a large --eval-batch-size)
            del terms["gradients"]
            if not self.steps_stay:
                del terms["activations"], terms["head"]
            terms["evaluation"] = self.evaluation
        terms["baseline"] = self.baseline
        shown = ", ".join(f"{name} {gib(value)}" for name, value in terms.items() if value or name == "weights")
        return f"memory: ~{gib(self.total)} GiB planned ({shown}) of {gib(self.available)} GiB available"


def gib(n: int) -> str:
    return f"{n / GIB:.2f}" if n < 10 * GIB else f"{n / GIB:.1f}"


@dataclasses.dataclass(frozen=True)
class Kept:
    """What one training forward keeps for backward, in bytes, counted on a fake model (FakeTensorMode)."""

    parameters: int
    trainable: int
    weight_bytes: int
    trained_bytes: int  # of the trainable parameters
    largest_layer_bytes: int  # weights of the largest transformer layer (what FSDP gathers at a time)
    outside: int  # kept outside the transformer layers and the head: embeddings, the final norm
    layers: tuple[int, ...]  # kept by each layer
    layer_inputs: tuple[int, ...]  # each layer's input hidden states: what gradient checkpointing keeps
    head: int  # kept by the head and its loss, with the fused head's workspace
    logits_row: int  # bytes of one row of evaluation logits (autocast dtype, fp32 copy, log-softmax)
    optimizer: int  # what the run's optimizer keeps after a step

    def activations(self, checkpointing: bool) -> int:
        """Kept by the body: every layer's saves, or with checkpointing every layer's input and one layer's
        saves, recomputed in backward."""
        if checkpointing:
            return self.outside + sum(self.layer_inputs) + max(self.layers, default=0)
        return self.outside + sum(self.layers)


def checkpoint_keys(path: str | Path) -> set[str] | None:
    """The tensor names a local safetensors checkpoint holds, read from its header (no tensor is loaded);
    None where there is none to read (a Hub name, a .bin checkpoint)."""
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    try:
        if index.is_file():
            return set(json.loads(index.read_text())["weight_map"])
        if (path / "model.safetensors").is_file():
            with safe_open(path / "model.safetensors", "pt") as f:
                return set(f.keys())
    except (OSError, ValueError, KeyError):  # unreadable: loading will say so; plan as if nothing were fresh
        return None
    return None


def fresh_parameters(model: nn.Module, keys: set[str] | None) -> frozenset[str]:
    """Parameters of `model` that a checkpoint of these tensor names lacks (they start random, as the embedded
    MiniLM's MLM head does). A checkpoint of the body alone names its tensors without the body's prefix."""
    if keys is None:
        return frozenset()
    prefix = f"{model.base_model_prefix}."
    return frozenset(name for name, _ in model.named_parameters()
                     if name not in keys and name.removeprefix(prefix) not in keys)


def faked(model: nn.Module, mode, device: torch.device) -> nn.Module:
    """`model` with every parameter and buffer replaced by a fake tensor of its shape and dtype on `device`
    (tied parameters stay tied)."""
    swapped = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in swapped:
            with mode:
                empty = torch.zeros(t.shape, dtype=t.dtype, device=device)
            swapped[id(t)] = nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty
        return swapped[id(t)]

    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None:
                    table[name] = fake(t)
    return model


def count_kept(config, model_class: str, cfg, fresh: frozenset[str], precision: str, device: torch.device,
               attention: str | None, batch: int, block: int, labelled_share: float, make_optimizer,
               adapter: str | None = None) -> Kept:
    """Run one training forward of `batch` x `block` tokens on a fake model built from `config` as the run builds
    it (LoRA adapters too: new, or the `adapter` directory's), and count what autograd keeps, by layer, and what the
    head keeps; then one step of the optimizer `make_optimizer` builds (lm.optim.build_optimizer's signature), and
    count what it keeps."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lm.hardware import autocast

    mode = FakeTensorMode()
    with model_errors():
        model = faked(planned_model(config, model_class, cfg, fresh, precision, attention, adapter), mode, device)
    model.train()
    params = list({id(p): p for p in model.parameters()}.values())
    trained = [p for p in params if p.requires_grad]
    layers = outermost_layers(model)
    saved = SavedTensors(params, layers)
    rows = max(1, round(batch * block * labelled_share))
    with model_errors(), mode, saved.counting(), autocast(device, precision):
        loss, workspace = training_forward(model, saved, device, precision, batch, block, rows)
    del loss  # it held the graph, and so every kept storage, while they were counted (a freed address is reused)
    low = 2 if precision != "fp32" else 0  # evaluation's logits: in the autocast dtype, in fp32, their log-softmax
    return Kept(
        parameters=sum(p.numel() for p in params), trainable=sum(p.numel() for p in trained),
        weight_bytes=sum(p.nbytes for p in params), trained_bytes=sum(p.nbytes for p in trained),
        largest_layer_bytes=max((sum(p.nbytes for p in layer.parameters()) for layer in layers), default=0),
        outside=saved.kept.get("outside", 0), layers=tuple(saved.kept.get(i, 0) for i in range(len(layers))),
        layer_inputs=tuple(saved.inputs), head=saved.kept.get("head", 0) + workspace,
        logits_row=config.vocab_size * (low + 4 + 4), optimizer=optimizer_state(model, cfg, make_optimizer, mode))


class CannotRun(Exception):
    """The model can't be built or can't run its forward: its own error (short_message's line), not a limit of fake
    tensors."""


@contextlib.contextmanager
def model_errors():
    """Raise the model's own errors inside this block as CannotRun; a UsageError, and what fake tensors can't run
    (a forward that reads values, an operator without a fake kernel), as they are."""
    from torch._subclasses import fake_tensor
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    from lm.modeling import short_message

    limits = (fake_tensor.DataDependentOutputException, fake_tensor.DynamicOutputShapeException,
              fake_tensor.UnsupportedOperatorException, fake_tensor.UnsupportedFakeTensorException,
              GuardOnDataDependentSymNode, NotImplementedError)
    try:
        yield
    except UsageError:
        raise
    except Exception as e:
        # .numpy() and the like name what they refuse (a tensor subclass, a fake or meta tensor)
        if isinstance(e, limits) or any(word in str(e).lower() for word in ("fake", "subclass", "meta")):
            raise
        raise CannotRun(short_message(e)) from e


def optimizer_state(model: nn.Module, cfg, make_optimizer, mode) -> int:
    """Bytes of the state the optimizer keeps after a step over the fake model's trained parameters, as it really
    allocates it: AdamW's two moments, SGD's momentum, Muon's on the hidden matrices and AdamW's on the rest, or
    whatever a factory's optimizer keeps."""
    from lm.optim import optimizers, parameter_groups

    with mode:
        optimizer = make_optimizer(parameter_groups(model, cfg.lr, cfg.weight_decay), cfg)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        optimizer.step()
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for o in optimizers(optimizer)
                for state in o.state.values() for t in state.values() if isinstance(t, torch.Tensor)}
    return sum(storages.values())


def planned_model(config, model_class: str, cfg, fresh: frozenset[str], precision: str, attention: str | None,
                  adapter: str | None = None) -> nn.Module:
    """The model of `config` on the meta device as the run builds it: under LoRA, peft's layers added (new ones, or
    those `adapter`'s config describes) and the frozen base in bf16 when the precision is (lm.train.build_model)."""
    from peft import LoraConfig, get_peft_model

    from lm import adapters

    lora = cfg.lora_rank > 0 or adapter is not None
    model = meta_model(config, model_class, attention, torch.bfloat16 if lora and precision == "bf16" else
                       torch.float32)
    with warnings.catch_warnings():  # peft's, about transformers' names: the run itself shows them
        warnings.simplefilter("ignore")
        if adapter is not None:  # as adapters.load_adapters wraps the model, from the adapter's config alone
            settings = LoraConfig.from_pretrained(adapter)
            settings.inference_mode = False  # (trainable, as load_adapters loads it)
            model = adapters.trained(get_peft_model(model, settings, autocast_adapter_dtype=True), fresh)[0]
        elif lora:
            model = adapters.add_adapters(model, cfg, fresh)[0]
    return model.get_base_model() if lora else model


def outermost_layers(model: nn.Module) -> list[nn.Module]:
    """The model's transformer layers, as gradient checkpointing sees them: its outermost
    GradientCheckpointingLayers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    return [m for m in layers if not any(m is not other and m in other.modules() for other in layers)]


class SavedTensors:
    """Adds up the bytes of the storages autograd keeps for backward, by where each was first kept: a layer's index,
    "outside" the layers, or "head" (set by the forward); each storage counted once, parameters never. Also records
    each layer's input hidden states (what gradient checkpointing keeps)."""

    def __init__(self, params: list[nn.Parameter], layers: list[nn.Module]):
        self.params = {p.untyped_storage()._cdata for p in params}
        self.layers = layers
        self.kept: dict = {}
        self.seen: set[int] = set()
        self.where = "outside"
        self.inputs = [0] * len(layers)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in self.seen and storage._cdata not in self.params:
            self.seen.add(storage._cdata)
            self.kept[self.where] = self.kept.get(self.where, 0) + storage.nbytes()
        return t

    def enter(self, i: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.inputs[i] = hidden.untyped_storage().nbytes()
            self.where = i
        return hook

    def leave(self, module, args, output) -> None:
        self.where = "outside"

    @contextlib.contextmanager
    def counting(self):
        """Count what autograd keeps inside this block, by layer."""
        handles = [h for i, layer in enumerate(self.layers) for h in (
            layer.register_forward_pre_hook(self.enter(i), with_kwargs=True), layer.register_forward_hook(self.leave))]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                yield
        finally:
            for h in handles:
                h.remove()


def training_forward(model: nn.Module, saved: SavedTensors, device: torch.device, precision: str, batch: int,
                     block: int, rows: int) -> tuple[torch.Tensor, int]:
    """TokenLoss.forward of `batch` x `block` tokens, `rows` of them labelled, with what the head keeps counted as
    "head": (the loss, the bytes of the fused head's workspace). The labelled positions are given in number: a boolean
    mask's selection has no size until it runs."""
    from lm.losses import TokenLoss, Workspace, chunkable, fused_head_loss

    module = TokenLoss(model)
    module.texts = False
    workspace = Workspace()
    input_ids = torch.zeros(batch, block, dtype=torch.long, device=device)
    attention_mask = torch.ones(batch, block, dtype=torch.long, device=device)
    labels = torch.zeros(rows, dtype=torch.long, device=device)
    index = torch.arange(rows, device=device)  # the labelled positions, as TokenLoss selects them
    if module.split is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        saved.where = "head"
        loss = F.cross_entropy(logits.flatten(0, 1)[index].float(), labels, reduction="sum")
    else:
        hidden = module.hidden_states(input_ids, attention_mask).flatten(0, 1)[index]
        saved.where = "head"
        head = getattr(model, module.split[1])
        if chunkable(head):
            dtype = torch.get_autocast_dtype(device.type) if precision != "fp32" else head.weight.dtype
            loss = fused_head_loss(hidden, head.weight, head.bias, labels, dtype, workspace)
        else:
            loss = F.cross_entropy(head(hidden).float(), labels, reduction="sum")
    return loss, sum(b.untyped_storage().nbytes() for b in workspace.buffers.values())


@dataclasses.dataclass
class Planner:
    """Plans one run's memory from the model's config, and again for other settings (memoised counts)."""

    config: object
    model_class: str
    precision: str
    device: torch.device
    attention: str | None
    fresh: frozenset[str]
    local: int = 1  # processes on this machine: on a CPU they share its memory
    make_optimizer: object = None  # (param_groups, cfg) -> optimizer, as train() takes it; None: build_optimizer
    adapter: str | None = None  # --model ADAPTER_DIR: the adapter's directory, whose LoRA layers the run trains
    counted: dict = dataclasses.field(default_factory=dict)

    def plan(self, cfg, block: int, processes: int = 1, distributed: bool = False) -> Plan:
        """The peak of one process of a run with these settings (`processes` in all: FSDP shards over them)."""
        masked = self.model_class.endswith("MaskedLM")  # the head runs on the masked positions alone
        share = cfg.mlm_prob if masked else (block - 1) / block
        key = (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout, cfg.batch_size, block, cfg.optimizer)
        if key not in self.counted:
            from lm.optim import build_optimizer

            self.counted[key] = count_kept(self.config, self.model_class, cfg, self.fresh, self.precision,
                                           self.device, self.attention, cfg.batch_size, block, share,
                                           self.make_optimizer or build_optimizer, self.adapter)
        kept = self.counted[key]
        weights, gradients, optimizer = kept.weight_bytes, kept.trained_bytes, kept.optimizer
        if cfg.fsdp:  # each process keeps its shard, and gathers a layer (and prefetches the next) to run it
            weights, gradients, optimizer = (-(-n // processes) for n in (weights, gradients, optimizer))
            weights += 2 * kept.largest_layer_bytes
        elif distributed:
            gradients *= 2  # DDP reduces gradients through buckets of their size
        eval_rows = round((cfg.eval_batch_size or cfg.batch_size) * block * share)
        evaluation = eval_rows * kept.logits_row + max(kept.layers, default=0)
        activations, head = kept.activations(cfg.gradient_checkpointing), kept.head
        if cfg.eval_only:
            gradients = optimizer = activations = head = 0
        available, baseline = self.room()
        if self.device.type != "cuda":
            baseline += int(CPU_SLACK * activations)
        return Plan(weights=weights, gradients=gradients, optimizer=optimizer, activations=activations, head=head,
                    evaluation=evaluation, baseline=baseline, available=available,
                    steps_stay=self.device.type != "cuda", parameters=kept.parameters, trainable=kept.trainable)

    def room(self) -> tuple[int, int]:
        """(bytes this process may use, bytes it holds before the run loads anything). A GPU's free memory is
        the run's own; on a CPU (or Apple's unified memory) the process holds its libraries already (counted
        after the counting forward, which imports what the model needs) and shares what is free."""
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0], 0
        resident = resident_bytes()
        return free_memory() // max(1, self.local) + resident, resident + CPU_ALLOWANCE

    def remedies(self, cfg, block: int, processes: int, distributed: bool) -> list[tuple[str, Plan]]:
        """Changes to the settings with which the run would fit, cheapest first: the first found of each kind,
        and where none alone does, the first two together."""
        def fits(changes: dict, n: int) -> Plan | None:
            plan = self.plan(dataclasses.replace(cfg, **changes), block, n, distributed or n > 1)
            return plan if plan.fits else None

        options = self.changes(cfg, processes)
        found, kinds = [], set()
        for flags, changes, n in options:
            kind = flags.split()[0]
            if kind not in kinds and (plan := fits(changes, n)):
                found.append((flags, plan))
                kinds.add(kind)
        if found:
            return found
        for i, (flags, changes, n) in enumerate(options):
            for other, more, m in options[i + 1:]:
                both = {**changes, **more}
                if (other.split()[0] != flags.split()[0] and not (both.get("fsdp") and both.get("lora_rank"))
                        and (plan := fits(both, max(n, m)))):
                    return [(f"{flags} {other}", plan)]
        return []

    def changes(self, cfg, processes: int) -> list[tuple[str, dict, int]]:
        """(flags, settings, processes) that lower the peak, cheapest first: the same training with gradient
        checkpointing (~30% more compute), or with the global batch in smaller micro-batches, or sharded over
        GPUs; then LoRA, which trains less."""
        if cfg.eval_only:  # an evaluation's batch is all there is to change
            batch = cfg.eval_batch_size or cfg.batch_size
            return [(f"--eval-batch-size {b}", {"eval_batch_size": b}, processes) for b in range(batch - 1, 0, -1)]
        options = [] if cfg.gradient_checkpointing else [
            ("--gradient-checkpointing", {"gradient_checkpointing": True}, processes)]
        for b in [b for b in range(cfg.batch_size - 1, 0, -1) if cfg.batch_size % b == 0]:
            accumulate = cfg.grad_accum_steps * cfg.batch_size // b
            options.append((f"--batch-size {b} --grad-accum-steps {accumulate}",
                            {"batch_size": b, "grad_accum_steps": accumulate}, processes))
        if self.device.type == "cuda" and not cfg.fsdp and cfg.lora_rank == 0:
            options += [(f"--fsdp over {n} GPUs (torchrun --nproc_per_node {n})", {"fsdp": True}, n)
                        for n in (2, 4, 8, 16, 32, 64)]
        if cfg.lora_rank == 0 and not cfg.from_scratch:  # (LoRA adapts a trained model)
            options.append((f"--lora-rank {LORA_RANK}", {"lora_rank": LORA_RANK}, processes))
        return options


def plan_run(cfg, config, model_class: str, model_path: str | None, precision: str, device: torch.device,
             processes: int, cache_dir, make_optimizer=None, adapter: str | None = None) -> Plan | None:
    """The memory plan of a run, from the model's config and the settings alone (nothing is loaded); a UsageError
    naming the changes that would fit where it does not, unless --ignore-memory-plan, or where a model from scratch
    can't be built or run; None (and a warning) where the model's forward can't be counted."""
    from lm.hardware import planned_attention
    from lm.modeling import max_positions, resolve_block_size

    block = resolve_block_size(cfg.block_size, max_positions(config, None))[0]
    attention = planned_attention(device, precision, config, cfg.batch_size, block, cache_dir)
    try:
        planned = planner(config, model_class, model_path, cfg, precision, device, attention, local_processes(),
                          make_optimizer, adapter)
        plan = planned.plan(cfg, block, processes, processes > 1)
    except UsageError:  # e.g. --lora-targets naming no layer of the model
        raise
    except CannotRun as e:  # a configuration from scratch is the user's: one that can't run is theirs to fix
        if cfg.from_scratch:
            said = str(e).rstrip(".")
            raise UsageError(f"{scratch_flags(cfg)}: the model this configuration describes can't run ({said}); fix "
                             "the configuration") from None
        warn_unplanned(e.__cause__)
        return None
    except Exception as e:  # a forward that fake tensors can't run (it reads a tensor's values): the run goes on
        warn_unplanned(e)
        return None
    if plan.fits or cfg.ignore_memory_plan:
        return plan
    remedies = planned.remedies(cfg, block, processes, processes > 1)
    fixes = ", or ".join(f"{flags} (~{gib(p.total)} GiB)" for flags, p in remedies)
    tried = ", ".join(dict.fromkeys(flags.split()[0] for flags, _, _ in planned.changes(cfg, processes)))
    raise UsageError(f"{plan.line()}: the run would not fit. "
                     + (f"It would with {fixes}" if fixes else f"It would not with {tried} either" if tried
                        else "No setting lowers it")
                     + "; --ignore-memory-plan starts it anyway")


def warn_unplanned(e: BaseException) -> None:
    """Say, on one line, that the run goes on without a plan, and why."""
    print(f"warning: no memory plan: the model's forward could not be counted ({type(e).__name__}: "
          f"{str(e).splitlines()[0][:200] if str(e) else ''})", file=sys.stderr)


def scratch_flags(cfg) -> str:
    """The options that describe a model from scratch, for messages."""
    flags = f"--model-type {cfg.model_type}" if cfg.model_type else f"--config-name {cfg.config_name}"
    return flags + (f" --config-overrides {cfg.config_overrides}" if cfg.config_overrides else "")


def planner(config, model_class: str, model_path: str | None, cfg, precision: str, device: torch.device,
            attention: str | None, local: int = 1, make_optimizer=None, adapter: str | None = None) -> Planner:
    """A Planner for a run whose model is read from `model_path`: the checkpoint's fresh parameters (named by
    its header) are those LoRA trains in full."""
    fresh = frozenset()
    if cfg.lora_rank > 0 and model_path is not None:
        fresh = fresh_parameters(meta_model(config, model_class, attention, torch.float32), checkpoint_keys(model_path))
    return Planner(config, model_class, precision, device, attention, fresh, local, make_optimizer, adapter)


def resident_bytes() -> int:
    """This process's resident memory now (Linux; elsewhere its peak so far)."""
    rss = status_kib("VmRSS")
    return rss * 1024 if rss is not None else peak_rss()


def free_memory() -> int:
    """Memory a new allocation can get on this machine: MemAvailable, capped by what the process's cgroup
    (v2, or v1) leaves under its limit, in the process's group and every group above it."""
    free = meminfo_available()
    for limit, usage, stat, inactive in cgroup_files():
        try:
            cap = int(limit.read_text().split()[0])
            used = int(usage.read_text().split()[0])
        except (OSError, ValueError, IndexError):  # "max" (no limit), or not there
            continue
        # the page cache the kernel reclaims first counts as free, as `docker stats` counts it
        reclaimable = next((int(line.split()[1]) for line in read_lines(stat) if line.split()[0] == inactive), 0)
        if cap < 2 ** 60:  # v1 writes "no limit" as a huge number
            free = min(free, cap - used + reclaimable)
    return max(free, 0)


def meminfo_available() -> int:
    for line in read_lines(Path("/proc/meminfo")):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")  # not Linux: the free pages


def cgroup_files() -> list[tuple[Path, Path, Path, str]]:
    """(limit, usage, stat file, its reclaimable key) of this process's memory cgroup and its ancestors."""
    found = []
    for line in read_lines(Path("/proc/self/cgroup")):
        number, controllers, path = line.split(":", 2)
        if number == "0" and controllers == "":  # v2
            root, names = Path("/sys/fs/cgroup"), ("memory.max", "memory.current", "memory.stat", "inactive_file")
        elif "memory" in controllers.split(","):  # v1
            root = Path("/sys/fs/cgroup/memory")
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_inactive_file")
        else:
            continue
        group = root / path.lstrip("/")
        for where in [group, *group.parents]:  # a container sees its own group at the root
            if where == root.parent:
                break
            found.append((where / names[0], where / names[1], where / names[2], names[3]))
    return found


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def peak_rss() -> int:
    """The process's peak resident memory in bytes: Linux's VmHWM, else ru_maxrss (bytes on macOS; 0 on Windows).

    Not ru_maxrss on Linux: a process started by fork (or vfork) and exec inherits its parent's peak there,
    so a run launched from a large process (a test runner, a notebook) would report the launcher's memory.
    The highest reading so far: Linux computes VmHWM from counters it syncs lazily, so after pages are freed a
    later reading can be tens of KiB below an earlier one, and a peak logged at a step must not exceed the run's."""
    global highest_rss
    hwm = status_kib("VmHWM")
    if hwm is not None:
        peak = hwm * 1024
    else:
        try:
            import resource
        except ImportError:
            return 0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak if sys.platform == "darwin" else peak * 1024
    highest_rss = max(highest_rss, peak)
    return highest_rss


highest_rss = 0  # peak_rss's highest reading in this process


def status_kib(field: str) -> int | None:
    """A memory field of /proc/self/status in KiB (VmRSS, VmHWM), or None where there is none (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_memory(device: torch.device) -> int:
    """What this process has taken at most: its peak resident memory, or on a GPU the most PyTorch allocated."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss()


def local_processes() -> int:
    """The processes torchrun starts on this machine (1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
