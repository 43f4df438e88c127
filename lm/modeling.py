"""Finding and loading the model and tokenizer: an embedded default, a directory, or a Hub name."""

from __future__ import annotations

from pathlib import Path

import torch

from lm import embedded
from lm.errors import UsageError
from lm.texts import hub_reachable

DEFAULT_BLOCK_SIZE = 128


def resolve_model(name: str | None, default: str, cache_dir: str | None = None, say=print) -> tuple[str, dict]:
    """(path or Hub name, extra from_pretrained kwargs) of `name`, else of the embedded `default`.
    Fails fast, in one line, when offline."""
    name = name or default
    if name in embedded.MODELS:
        return str(embedded.model_dir(name, cache_dir, say)), {}
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise UsageError(f"--model {name}: the directory holds no config.json (is it a saved model?)")
        return name, {}
    if Path(name).exists() or name.startswith((".", "/")):
        raise UsageError(f"--model {name}: no such model directory")
    if hub_reachable():
        return name, {}
    from transformers import AutoConfig

    try:  # a model cached by an earlier online run still loads offline
        AutoConfig.from_pretrained(name, local_files_only=True)
        return name, {"local_files_only": True}
    except (OSError, ValueError):
        raise UsageError(
            f"--model {name}: not a directory, and the Hugging Face Hub is unreachable; use the embedded "
            f"default (drop --model: {default}) or --model DIR, and --train-file "
            "for your own text") from None


def load_tokenizer(path: str, extra: dict):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, **extra)


def max_positions(config, tokenizer) -> int | None:
    """The longest block the model accepts: its position table, capped by the tokenizer's limit."""
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else None


def resolve_block_size(requested: int | None, limit: int | None) -> tuple[int, str | None]:
    """(block size, warning or None): the default is lowered to fit; an explicit size above it is an error."""
    if requested is not None:
        if limit is not None and requested > limit:
            raise UsageError(f"--block-size {requested} is above the model's maximum of {limit} positions")
        return requested, None
    if limit is not None and limit < DEFAULT_BLOCK_SIZE:
        return limit, f"block size lowered from {DEFAULT_BLOCK_SIZE} to the model's maximum of {limit}"
    return DEFAULT_BLOCK_SIZE, None


def load_config(path: str, extra: dict):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, **extra)


def load_model(path: str, extra: dict, model_class: str) -> tuple[torch.nn.Module, frozenset[str]]:
    """(fp32 model, names of parameters the checkpoint lacked and were freshly initialised).

    `model_class` names the transformers Auto class, e.g. AutoModelForCausalLM."""
    import transformers
    from transformers.utils import logging as hf_logging

    auto = getattr(transformers, model_class)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # we report fresh parameters ourselves, in one line
    try:
        model, info = auto.from_pretrained(path, dtype=torch.float32, output_loading_info=True, **extra)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = set(info.get("missing_keys", ()))
    fresh = frozenset(n for n, _ in model.named_parameters() if n in missing)
    return model, fresh
