"""The optimizer (its parameter groups, the built-in choices of --optimizer) and the learning-rate schedule as a
function of the step."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from lm.errors import UsageError
from lm.modeling import transformer_layers

SGD_MOMENTUM = 0.9  # torch's SGD has none by default; 0.9 is what SGD for transformers is usually given


def parameter_groups(model: nn.Module, lr: float, weight_decay: float,
                     new_params: frozenset[str] = frozenset(), new_lr: float | None = None) -> list[dict]:
    """The trainable parameters in groups: no weight decay on 1-D tensors (biases, norm weights); `new_params` get
    `new_lr`. Each group also lists its parameters' `names`, and in `hidden` which of them are 2-D weights inside
    a transformer layer: the hidden matrices Muon is for (not the embeddings, the head, norms or biases)."""
    layers = tuple(f"{name}." for name, _ in transformer_layers(model))
    groups: dict[tuple[bool, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay, new = p.ndim >= 2, name in new_params
        group = groups.setdefault((decay, new), {
            "params": [], "names": [], "hidden": [], "weight_decay": weight_decay if decay else 0.0,
            "base_lr": new_lr if new and new_lr is not None else lr})
        group["lr"] = group["base_lr"]
        group["params"].append(p)
        group["names"].append(name)
        group["hidden"].append(p.ndim == 2 and name.startswith(layers))
    return [groups[k] for k in sorted(groups)]


# The schedules are transformers' (lm.config.SCHEDULES names them) with their default settings:
POLYNOMIAL_END_LR = 1e-7  # polynomial decays (power 1) to this learning rate, not to 0
INVERSE_SQRT_TIMESCALE = 10_000  # inverse_sqrt's timescale when there is no warmup


def lr_factor(step: int, total: int, warmup: int, kind: str, lr: float = 1.0) -> float:
    """Multiplier of the peak learning rate `lr` at optimizer step `step` (0-based), as transformers' schedule
    `kind` gives it. Only polynomial depends on `lr`: it decays to an absolute POLYNOMIAL_END_LR."""
    if kind == "constant":
        return 1.0  # no warmup, as in transformers: constant_with_warmup has one
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "constant_with_warmup":
        return 1.0
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if kind == "cosine_with_restarts":  # one cycle by default: cosine, then 0 from the last step on
        return 0.0 if progress >= 1 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * (progress % 1.0))))
    if kind == "polynomial":
        end = POLYNOMIAL_END_LR
        return (end if step > total else (lr - end) * (1 - progress) + end) / lr
    if kind == "inverse_sqrt":
        timescale = warmup or INVERSE_SQRT_TIMESCALE
        return 1.0 / math.sqrt((step + timescale - warmup) / timescale)
    raise ValueError(kind)


def build_optimizer(groups: list[dict], cfg) -> torch.optim.Optimizer:
    """The optimizer --optimizer names, over parameter_groups' groups: torch's AdamW (the fused kernel where the device
    has one, unless under --fsdp), SGD with momentum, or Muon on the hidden matrices with AdamW on the rest. The
    signature of train()'s `optimizer` argument, of which this is the default."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(plain(groups), lr=cfg.lr, momentum=SGD_MOMENTUM)
    if cfg.optimizer == "adamw":
        return adamw(plain(groups), cfg)
    if not hasattr(torch.optim, "Muon"):
        raise UsageError(f"--optimizer muon needs torch.optim.Muon, which torch {torch.__version__} lacks: "
                         "upgrade torch")
    hidden, rest = split_hidden(groups)
    if not hidden:
        raise UsageError("--optimizer muon trains the 2-D weights inside transformer layers, and this model has none "
                         "that train: use --optimizer adamw")
    # Moonshot's scaling of each matrix's step (0.2 x sqrt(its larger side)) gives Muon's updates AdamW's RMS, so
    # one --lr (and --weight-decay) serves both
    muon = torch.optim.Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw")
    return Combined(muon, adamw(rest, cfg)) if rest else muon


def split_hidden(groups: list[dict]) -> tuple[list[dict], list[dict]]:
    """parameter_groups' groups cut in two by their `hidden` flags: (the hidden matrices' groups, the others'), as
    plain groups with their settings; empty ones left out."""
    hidden, rest = [], []
    for group, settings in zip(groups, plain(groups)):
        for wanted, cut in ((True, hidden), (False, rest)):
            params = [p for p, h in zip(group["params"], group["hidden"]) if h == wanted]
            if params:
                cut.append(dict(settings, params=params))
    return hidden, rest


def plain(groups: list[dict]) -> list[dict]:
    """Groups as torch's optimizers take them: without parameter_groups' per-parameter lists."""
    return [{k: v for k, v in g.items() if k not in ("names", "hidden")} for g in groups]


def adamw(groups: list[dict], cfg) -> torch.optim.AdamW:
    device = groups[0]["params"][0].device.type if groups else "cpu"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, fused=not cfg.fsdp and device in ("cuda", "cpu"))


class Combined:
    """Optimizers over disjoint parameter groups, stepped as one (Muon on the hidden matrices, AdamW on the rest):
    the loop, the schedule, the fp16 gradient scaler and checkpoints see one optimizer."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:  # read afresh: load_state_dict replaces an optimizer's list
        return [group for o in self.optimizers for group in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for o, saved in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(saved)


def optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers an optimizer is made of: itself, or a Combined one's."""
    return list(optimizer.optimizers) if isinstance(optimizer, Combined) else [optimizer]


def describe(optimizer) -> str:
    """The optimizer's classes, as a checkpoint records them: 'AdamW', 'Muon+AdamW', 'Lion'."""
    return "+".join(type(o).__name__ for o in optimizers(optimizer))


def saved_groups(state: dict) -> list[dict]:
    """The parameter groups of a saved optimizer state (of each optimizer, when combined)."""
    return [group for saved in state.get("optimizers", [state]) for group in saved.get("param_groups", [])]


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Set every group's learning rate to its peak (`base_lr`) times `factor`; returns the first group's."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]


def schedule(cfg, n_train: int, processes: int) -> tuple[int, int]:
    """(total optimizer steps, warmup steps) for `n_train` examples shared by `processes`."""
    steps_per_epoch = math.ceil(n_train / (cfg.batch_size * processes * cfg.grad_accum_steps))  # lm.data.StepSampler
    total = cfg.max_train_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return total, cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total)


# The options that decide the learning rate at a step.
SCHEDULE_OPTIONS = ("lr", "lr_scheduler", "warmup_steps", "warmup_ratio", "epochs", "max_train_steps", "batch_size",
                    "grad_accum_steps")


def schedule_change(saved_config: dict, saved_processes: int, cfg, processes: int, n_train: int,
                    step: int, last_group: dict | None = None) -> str | None:
    """How the learning rate goes on from `step` when a resumed run changed its schedule; None if it didn't.

    `last_group` (the checkpoint's first optimizer group: the lr of its last step and its peak) also catches a
    schedule whose meaning changed under the same settings: `constant` warmed up before constant_with_warmup
    existed."""
    saved = dataclasses.replace(cfg, **{k: saved_config[k] for k in SCHEDULE_OPTIONS})
    before, now = schedule(saved, n_train, saved_processes), schedule(cfg, n_train, processes)
    old = saved.lr * lr_factor(step, *before, saved.lr_scheduler, saved.lr)
    new = cfg.lr * lr_factor(step, *now, cfg.lr_scheduler, cfg.lr)
    last = last_group or {}
    if step > 0 and last.get("base_lr"):
        ran, gives = last["lr"] / last["base_lr"], lr_factor(step - 1, *before, saved.lr_scheduler, saved.lr)
        if not math.isclose(ran, gives, rel_tol=1e-6, abs_tol=1e-12):
            hint = (": its 'constant' schedule warmed up, as constant_with_warmup does now; pass --lr-scheduler "
                    "constant_with_warmup to keep that" if saved.lr_scheduler == "constant" and before[1] else "")
            return (f"resume: the checkpoint's step {step} ran at lr {ran * last['base_lr']:.3g}, where its settings "
                    f"now give {gives * last['base_lr']:.3g}{hint}; lr at step {step + 1} {new:.3g}")
    if (*before, saved.lr_scheduler, saved.lr) == (*now, cfg.lr_scheduler, cfg.lr):
        return None
    return (f"resume: {cfg.lr_scheduler} schedule over {now[0]} steps ({now[1]} warmup), was {saved.lr_scheduler} "
            f"over {before[0]} ({before[1]}): lr at step {step + 1} {old:.3g} -> {new:.3g}")
