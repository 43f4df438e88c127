"""Finding and loading the model and tokenizer (an embedded default, a directory, or a Hub name), or building a
model from scratch."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lm import embedded
from lm.errors import UsageError
from lm.texts import hub_reachable

DEFAULT_BLOCK_SIZE = 128


def resolve_model(name: str | None, default: str, cache_dir: str | None = None, say=print,
                  what: str = "--model") -> tuple[str, dict]:
    """(path or Hub name, extra from_pretrained kwargs) of `name`, else of the embedded `default`.
    Fails fast, in one line, when offline. `what` names the option in messages (--model or --tokenizer)."""
    name = name or default
    if name in embedded.MODELS:
        return str(embedded.model_dir(name, cache_dir, say)), {}
    if Path(name).is_dir():
        if what != "--tokenizer" and not (Path(name) / "config.json").is_file():
            raise UsageError(f"{what} {name}: the directory holds no config.json (is it a saved model?)")
        return name, {}
    if Path(name).exists() or name.startswith((".", "/")):
        raise UsageError(f"{what} {name}: no such directory")
    if hub_reachable():
        return name, {}
    from transformers import AutoConfig, AutoTokenizer

    try:  # a model or tokenizer cached by an earlier online run still loads offline
        (AutoTokenizer if what == "--tokenizer" else AutoConfig).from_pretrained(name, local_files_only=True)
        return name, {"local_files_only": True}
    except (OSError, ValueError):
        instead = {"--model": f"use the embedded default (drop --model: {default}) or --model DIR, and --train-file "
                              "for your own text"}.get(what, f"use {what} DIR")
        raise UsageError(f"{what} {name}: not a directory, and the Hugging Face Hub is unreachable; {instead}") from None


# Files from which AutoTokenizer builds a tokenizer; save_pretrained writes tokenizer_config.json beside them
# (alone, it describes tokenizers without a vocabulary, e.g. byte-level ones).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def resolve_tokenizer(requested: str | None, model_path: tuple[str, dict], owner: str,
                      cache_dir: str | None = None, say=print) -> tuple[str, dict]:
    """(path or Hub name, from_pretrained kwargs) of the tokenizer: --tokenizer, else the one saved with the model
    (`owner` names the option that gave `model_path`, for messages: "--model DIR").

    A directory must hold tokenizer files: without them transformers builds an empty tokenizer for
    some models (every text becomes 0 tokens) and fails with an unrelated message for others.
    """
    if requested is not None:
        path, extra = resolve_model(requested, requested, cache_dir, say, what="--tokenizer")
        flag = f"--tokenizer {requested}"
    else:
        (path, extra), flag = model_path, owner
    if Path(path).is_dir() and not holds_tokenizer(path):
        raise UsageError(f"{flag}: the directory {path} holds no tokenizer ({', '.join(TOKENIZER_FILES[:4])}, ...); "
                         + ("save one there with tokenizer.save_pretrained, or " if requested is None else "")
                         + "name the tokenizer to use with --tokenizer DIR")
    return path, extra


def holds_tokenizer(path: str | Path) -> bool:
    """Whether a directory holds files from which AutoTokenizer builds a tokenizer."""
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: str, extra: dict):
    """The tokenizer at `path`; one that can't be built, or turns text into no tokens, is a UsageError."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    except Exception as e:  # a damaged file fails in many ways (KeyError, TypeError, a tokenizers error...)
        raise UsageError(f"the tokenizer in {path} could not be loaded ({short_message(e)}); "
                         "name a working one with --tokenizer DIR") from None
    if not tokenizer("The quick brown fox.", add_special_tokens=False)["input_ids"]:
        raise UsageError(f"the tokenizer in {path} turns text into no tokens (its vocabulary is empty); "
                         "name a working one with --tokenizer DIR")
    return tokenizer


def check_model_class(config, model_class: str, owner: str, default: str) -> None:
    """Refuse a model the task's Auto class can't load (e.g. GPT-2 for masked LM) before any data is tokenized.
    `owner` names the option that gave the model, for the message: "--model DIR"."""
    import transformers

    mapping = getattr(getattr(transformers, model_class), "_model_mapping", None)
    if mapping is not None and type(config) not in mapping:
        raise UsageError(f"{owner} is a {config.model_type} model, which {model_class} cannot load: "
                         f"this task needs another kind of model, such as the default ({default})")


def max_positions(config, tokenizer) -> int | None:
    """The longest block the model accepts: its position table, capped by the tokenizer's limit (if given)."""
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
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
    """The model's configuration; one that can't be read or is inconsistent is a UsageError naming the file."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, **extra)
    except Exception as e:  # invalid JSON, an unknown model type, values its own checks refuse
        where = Path(path) / "config.json" if Path(path).is_dir() else path
        raise UsageError(f"the model configuration {where} could not be loaded ({short_message(e)}); "
                         "fix it or name another model with --model") from None


def check_vocabulary(tokenizer, config, tokenizer_name: str, model_name: str) -> None:
    """Refuse a tokenizer whose ids reach past the model's embedding table (they would index out of range)."""
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise UsageError(f"the tokenizer {tokenizer_name} has {len(tokenizer):,} tokens, the model {model_name} "
                         f"embeds {vocab:,}: they don't belong together; use the model's own tokenizer "
                         "(drop --tokenizer) or one of at most its vocabulary")


def short_message(error: Exception) -> str:
    """An exception's type and message on one line: its first line, and its last where they differ (a
    validation error names the validator first and the reason last)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = " ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""
    return f"{type(error).__name__}: {said}"[:400] if said else type(error).__name__


def load_model(path: str, extra: dict, model_class: str, attention: str | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, frozenset[str]]:
    """(model, names of parameters the checkpoint lacked and were freshly initialised), in fp32 unless `dtype`
    says otherwise (a frozen base under LoRA is kept in bf16).

    `model_class` names the transformers Auto class, e.g. AutoModelForCausalLM; `attention` its
    attention implementation (lm.hardware.choose_attention; None: transformers' choice)."""
    import transformers
    from transformers.utils import logging as hf_logging

    auto = getattr(transformers, model_class)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # we report fresh parameters ourselves, in one line
    try:
        model, info = auto.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                           **({"attn_implementation": attention} if attention else {}), **extra)
    except OSError as e:  # no weights in the directory, a truncated file
        raise UsageError(f"the model in {path} could not be loaded ({short_message(e)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = set(info.get("missing_keys", ()))
    fresh = frozenset(n for n, _ in model.named_parameters() if n in missing)
    return model, fresh


def transformer_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of the model's transformer layers, in order: the children of its outermost ModuleLists
    (BERT's encoder.layer, GPT-2's h, Llama's layers)."""
    layers, lists = [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and not any(name.startswith(f"{outer}.") for outer in lists):
            lists.append(name)
            layers += [(f"{name}.{child}" if name else child, block) for child, block in module.named_children()]
    return layers

# ---------------------------------------------------------------- a model from scratch

def scratch_config(model_type: str | None, config_path: tuple[str, dict] | None, overrides: dict[str, str]):
    """The configuration of a model from scratch: `model_type`'s defaults, or the configuration at `config_path`,
    with `overrides` (--config-overrides: {KEY: text}) typed as the fields they set.

    A model type's configuration is built with the overrides, so fields derived from others (e.g. Llama's head_dim,
    hidden_size / num_attention_heads) follow them; a saved configuration keeps what its file states."""
    from transformers import AutoConfig

    if model_type:
        try:
            base = AutoConfig.for_model(model_type)
        except ValueError:
            raise UsageError(f"--model-type {model_type}: not a transformers model type (e.g. llama, gpt2, bert)"
                             ) from None
    else:
        base = load_config(*config_path)
    aliases = getattr(base, "attribute_map", {})  # e.g. GPT-2's hidden_size is n_embd
    typed = {aliases.get(key, key): override_value(base, key, text) for key, text in overrides.items()}
    try:
        config = (AutoConfig.for_model(model_type, **typed) if model_type
                  else type(base).from_dict({**base.to_dict(), **typed}))
    except Exception as e:  # the configuration's own checks, e.g. heads that don't divide the hidden size
        raise UsageError(f"--config-overrides {format_overrides(overrides)}: {short_message(e)}") from None
    # a check transformers' configurations leave to the forward (a shape mismatch in attention)
    heads, shared = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(shared, int) and shared > 0 and heads % shared:
        where = (f"--config-overrides {format_overrides(overrides)}" if overrides
                 else f"--model-type {model_type}" if model_type else f"--config-name {config_path[0]}")
        raise UsageError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {shared} "
                         "(each key/value head serves a whole group of query heads)")
    return config


def override_value(config, key: str, text: str):
    """`text` as a value of `config`'s field `key`: of that field's type (bool, int, float, str), or for a field
    that is None, a JSON number or true/false, else the text."""
    if not hasattr(config, key):
        raise UsageError(f"--config-overrides {key}={text}: {type(config).__name__} has no field {key!r}")
    current = getattr(config, key)
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise UsageError(f"--config-overrides {key}={text}: {key} is true or false")
        return text.lower() in ("true", "1")
    if isinstance(current, (int, float, str)):
        try:
            return type(current)(text)
        except ValueError:
            raise UsageError(f"--config-overrides {key}={text}: {key} is "
                             + ("an integer" if isinstance(current, int) else "a number")) from None
    if current is None:
        try:
            value = json.loads(text)
        except ValueError:
            return text
        return value if isinstance(value, (bool, int, float)) else text
    raise UsageError(f"--config-overrides {key}={text}: {key} is a {type(current).__name__}, which KEY=VALUE can't "
                     "set; save a config.json with it and give its directory as --config-name")


def format_overrides(overrides: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in overrides.items())


def fit_to_tokenizer(config, tokenizer, overrides: dict[str, str]) -> None:
    """Give a configuration from scratch the tokenizer's vocabulary, all of it and no more, and its special tokens
    (bos, eos, pad), unless --config-overrides set them."""
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    for key, value in ids.items():
        if key not in overrides and hasattr(config, key):
            setattr(config, key, value)


def new_model(config, model_class: str, attention: str | None = None,
              dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A model of `config`, initialised by its architecture's own _init_weights (under the caller's seed), in
    `dtype`. `model_class` and `attention` as for load_model. Under `with torch.device("meta")`: shapes and dtypes
    alone, no memory (meta_model)."""
    import transformers

    auto = getattr(transformers, model_class)
    return auto.from_config(config, dtype=dtype, **({"attn_implementation": attention} if attention else {}))


def meta_model(config, model_class: str, attention: str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model `config` describes on the meta device: its modules, shapes and dtypes, no memory, no weights read
    (transformers' warnings about it silenced)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            return new_model(config, model_class, attention, dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
