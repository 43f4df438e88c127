"""LoRA adapters, in peft's format: which layers get them, wrapping a model, loading an adapter directory,
and what a run saves (the adapter, and with --merge-lora a merged model that loads without peft).

The loop trains the wrapped model like any other: peft puts its low-rank layers inside the model's own
modules, so the loss module, DDP and torch.compile see an ordinary transformers model whose frozen
weights have requires_grad off.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lm.errors import UsageError
from lm.modeling import load_model, meta_model

ADAPTER_CONFIG = "adapter_config.json"


def adapter_config(path: str | Path) -> dict:
    """An adapter directory's adapter_config.json, checked to be a LoRA adapter that names its base model."""
    try:
        config = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {path}: {ADAPTER_CONFIG} could not be read ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA" or not config.get("base_model_name_or_path"):
        raise UsageError(f"--model {path}: {ADAPTER_CONFIG} is not a LoRA adapter that names its base model "
                         "(peft_type LORA, base_model_name_or_path)")
    return config


def adapter_base(path: str | Path) -> str:
    """The base model an adapter directory was trained on (its adapter_config.json's base_model_name_or_path)."""
    return adapter_config(path)["base_model_name_or_path"]


def body_prefix(model: nn.Module) -> str:
    """Where the transformer body sits in the model (transformers' base_model_prefix: "model", "bert", ...)."""
    return model.base_model_prefix if hasattr(model, model.base_model_prefix) else ""


def linear_names(model: nn.Module) -> list[str]:
    """The names (last part) of the body's linear layers: q_proj, ..., down_proj for Llama-style models,
    c_attn/c_proj/c_fc for GPT-2 (transformers' Conv1D), query/key/value/dense for BERT-style ones."""
    from transformers.pytorch_utils import Conv1D

    prefix = body_prefix(model)
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (nn.Linear, Conv1D)) and name.startswith(f"{prefix}.")})


def lora_config(model: nn.Module, cfg, fresh: frozenset[str]):
    """peft's LoraConfig of a run: --lora-targets (default: every linear layer of the body) in the body only
    (the head keeps its own layers of the same names, e.g. BERT's head.dense), and the modules holding
    freshly initialised parameters (a head the checkpoint lacks) trained in full as modules_to_save."""
    from peft import LoraConfig

    targets = cfg.lora_targets.split(",") if cfg.lora_targets else linear_names(model)
    prefix = body_prefix(model)
    body = [(name.rsplit(".", 1)[-1], module) for name, module in model.named_modules() if name.startswith(f"{prefix}.")]
    missing = sorted(set(targets) - {name for name, _ in body})
    if missing:
        raise UsageError(f"--lora-targets: {', '.join(missing)} is not a layer of this model's body; its linear "
                         f"layers are {', '.join(linear_names(model))}")
    kinds = adaptable()
    unfit = sorted({f"{name} is a {type(module).__name__}" for name, module in body
                    if name in targets and not isinstance(module, kinds)})
    if unfit:  # peft would refuse it with a traceback, after the data is tokenized and the model loaded
        raise UsageError(f"--lora-targets: {', '.join(unfit)}, which LoRA can't adapt (it adapts linear, embedding "
                         f"and convolution layers); this model's linear layers are {', '.join(linear_names(model))}")
    outside = [name for name, _ in model.named_modules()
               if name.rsplit(".", 1)[-1] in targets and not name.startswith(f"{prefix}.")]
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, exclude_modules=outside or None,
                      modules_to_save=fresh_modules(model, fresh) or None)


def adaptable() -> tuple[type, ...]:
    """The kinds of layer peft's LoRA adapts (peft.tuners.lora.model's dispatchers)."""
    from transformers.pytorch_utils import Conv1D

    return nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D


def fresh_modules(model: nn.Module, fresh: frozenset[str]) -> list[str]:
    """The fewest modules that hold every fresh parameter (BERT's head: cls.predictions)."""
    owners = sorted({name.rsplit(".", 1)[0] for name in fresh})
    return [o for o in owners if not any(o.startswith(f"{other}.") for other in owners if other != o)]


def check_targets(config, model_class: str, cfg) -> None:
    """Refuse --lora-targets that name no layer of the model's body, or one LoRA can't adapt, from its config alone
    (before any loading)."""
    lora_config(meta_model(config, model_class), cfg, frozenset())


def check_kept_settings(path: str | Path, cfg) -> None:
    """Refuse --lora-alpha, --lora-dropout or --lora-targets that differ from those of the adapter in `path`, which
    keeps its own (its layers and scale are what was trained)."""
    config = adapter_config(path)
    saved = config.get("target_modules")
    saved = sorted(saved) if isinstance(saved, list) else [saved]
    own = {"lora-alpha": f"{config.get('lora_alpha'):g}", "lora-dropout": f"{config.get('lora_dropout', 0.0):g}",
           "lora-targets": ",".join(map(str, saved))}
    given = {"lora-alpha": cfg.lora_alpha is not None and cfg.lora_alpha != config.get("lora_alpha"),
             "lora-dropout": cfg.lora_dropout != 0 and cfg.lora_dropout != config.get("lora_dropout", 0.0),
             "lora-targets": cfg.lora_targets is not None and sorted(cfg.lora_targets.split(",")) != saved}
    differ = [flag for flag, different in given.items() if different]
    if differ:
        raise UsageError(f"--model {path} holds a LoRA adapter, which keeps its own settings ("
                         + ", ".join(f"--{flag} {value}" for flag, value in own.items())
                         + f"): drop {', '.join(f'--{flag}' for flag in differ)}")


def add_adapters(model: nn.Module, cfg, fresh: frozenset[str]) -> tuple[object, frozenset[str]]:
    """(the model wrapped with new LoRA adapters: a PeftModel, the names its fresh parameters train under):
    base weights frozen, adapters and fresh modules trainable in fp32, whatever the base's dtype."""
    from peft import get_peft_model

    ids = tensor_ids(model, fresh)
    wrapped = get_peft_model(model, lora_config(model, cfg, fresh), autocast_adapter_dtype=True)
    return trained(wrapped, ids)


def load_adapters(model: nn.Module, path: str | Path, fresh: frozenset[str]) -> tuple[object, frozenset[str]]:
    """add_adapters with the adapter saved in `path` (trainable: to train further or evaluate)."""
    from peft import PeftModel

    ids = tensor_ids(model, fresh)
    wrapped = PeftModel.from_pretrained(model, str(path), is_trainable=True, autocast_adapter_dtype=True)
    return trained(wrapped, ids)


def tensor_ids(model: nn.Module, names: frozenset[str]) -> set[int]:
    """The identities of `model`'s parameters named in `names` (and of those tied to them), taken before peft wraps
    the model: it renames them (BERT's cls.predictions.bias becomes cls.predictions.original_module.bias)."""
    return {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in names}


def trained(wrapped, fresh_ids: set[int]) -> tuple[object, frozenset[str]]:
    """What a wrapped model trains: the copies of fresh modules share what the checkpoint had, and train in fp32
    with the adapters. Returns the model and the names of the trainable copies of fresh parameters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    share_pretrained(wrapped, fresh_ids)
    for p in wrapped.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    for layer in wrapped.modules():
        if isinstance(layer, BaseTunerLayer):
            # peft would cast a bf16 input to the adapter's fp32 and autocast back to bf16: a second copy of every
            # adapted layer's input kept for backward (~300 MB for SmolLM2 at 8 x 128) and two casts, for nothing
            layer.cast_input_dtype_enabled = False
    copies = frozenset(name for name, p in wrapped.get_base_model().named_parameters()
                       if p.requires_grad and ".modules_to_save." in name)
    return wrapped, copies


def share_pretrained(wrapped, fresh_ids: set[int]) -> None:
    """In peft's trainable copy of a module holding fresh parameters, point the parameters the checkpoint did
    have back at the frozen originals: BERT's head holds its decoder, tied to the (frozen) word embeddings,
    which must stay the embeddings, beside its fresh transform and bias, which train. Found by identity, so
    a tensor tied to a fresh one (the decoder's bias is the head's bias) trains as that one does."""
    from peft.utils import ModulesToSaveWrapper

    model = wrapped.get_base_model()
    for wrapper in [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]:
        for copy in wrapper.modules_to_save.values():
            for name, sub in copy.named_modules():
                for pname, _ in list(sub.named_parameters(recurse=False)):
                    original = getattr(wrapper.original_module.get_submodule(name), pname)
                    if id(original) not in fresh_ids:
                        setattr(sub, pname, original)


def save(wrapped, out: Path, base_name: str) -> None:
    """The adapter (adapter_config.json + adapter_model.safetensors) in `out`, naming `base_name` as its base."""
    wrapped.peft_config["default"].base_model_name_or_path = base_name
    wrapped.save_pretrained(out)


def merged(wrapped) -> nn.Module:
    """`wrapped`'s adapters (and fresh modules) added into its model, in fp32: a plain transformers model, which
    from_pretrained loads without peft. The merge is only as exact as the base in memory: see merged_model."""
    # in fp32: added into a bf16 weight, most of a small update would round away
    return wrapped.float().merge_and_unload()


def merged_model(adapter_dir: str | Path, base: tuple[str, dict], model_class: str) -> nn.Module:
    """The adapter saved in `adapter_dir` added into its base read in fp32 from `base` ((path or Hub name,
    from_pretrained kwargs)), as AutoModel class `model_class`. What the adapter leaves alone is the base's own
    tensor bit for bit, and an adapted weight is the fp32 W + the adapter's delta: not merged into a copy of the base
    kept in bf16, whose rounding would be saved as if it were fp32."""
    from peft import PeftModel

    model, fresh = load_model(*base, model_class)
    ids = tensor_ids(model, fresh)
    wrapped = PeftModel.from_pretrained(model, str(adapter_dir))
    share_pretrained(wrapped, ids)  # e.g. BERT's head decoder: the base's own word embeddings, not the file's copy
    return merged(wrapped)
