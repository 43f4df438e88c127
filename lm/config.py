"""Every option of a run in one dataclass; the command line is generated from it."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Optional, Union

from lm import hf_flags
from lm.chats import EMBEDDED_CHATS, LOSS_RULES
from lm.errors import UsageError

EMBEDDED_CORPUS = "python-docs"
LORA_LR_FACTOR = 10  # LoRA learns its update from zero: ~10x full fine-tuning's step (LoRA's paper, torchtune, litgpt)
OPTIMIZERS = ("adamw", "muon", "sgd")  # lm.optim.build_optimizer
# transformers' learning-rate schedules (get_scheduler's names) that need no setting beyond warmup; lm.optim.lr_factor
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # the weights' types lm.gguf writes
SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
             "inverse_sqrt")


def option(default, help, **meta):
    """A config field whose help text (and optional `choices`, `type`, `cli=False`) feeds the CLI."""
    return field(default=default, metadata={"help": help, **meta})


def _number_or_text(text: str):
    """A float where the text is one, else the text: validated() judges it."""
    try:
        return float(text)
    except ValueError:
        return text


@dataclass
class Config:
    """All settings of a fine-tuning run. Defaults that depend on the task are filled in by `for_task`."""

    task: str = option("clm", "the objective's name: clm, mlm, or one a script defines; set by the entry script",
                       cli=False)

    # --- model and data ---
    model: Optional[str] = option(
        None, "model directory or Hub name; default: the embedded model of the task "
        "(clm: smollm2-135m-instruct, mlm: all-minilm-l6-v2)")
    tokenizer: Optional[str] = option(
        None, "tokenizer directory, Hub name or embedded default; default: the tokenizer saved with --model (or "
        "--config-name)")
    model_type: Optional[str] = option(
        None, "train from scratch: a transformers model type (e.g. llama, gpt2, bert) with its default configuration "
        "and fresh weights; needs --tokenizer")
    config_name: Optional[str] = option(
        None, "train from scratch: the configuration of a model directory, Hub name or embedded default "
        "(smollm2-135m-instruct, all-minilm-l6-v2), with fresh weights")
    config_overrides: Optional[str] = option(
        None, "with --model-type or --config-name: KEY=VALUE,... settings of the configuration (e.g. "
        "num_hidden_layers=4,hidden_size=256), each value of the type of the field it sets")
    dataset: Optional[str] = option(
        None, f"Hub dataset name (e.g. wikitext), or '{EMBEDDED_CHATS}': the embedded conversations (Python's docs "
        f"as questions and answers); default: the embedded corpus '{EMBEDDED_CORPUS}' unless --train-file is given")
    dataset_config: Optional[str] = option(None, "Hub dataset configuration (e.g. wikitext-2-raw-v1)")
    train_file: Optional[str] = option(None, "training text: .txt (one text per line), .csv, .json or .jsonl")
    validation_file: Optional[str] = option(None, "validation text, same formats as --train-file")
    text_column: str = option("text", "column holding the text in .csv/.json/.jsonl files and Hub datasets")
    validation_split_percentage: float = option(
        5.0, "percent of the training texts held out when there is no validation split")
    block_size: Optional[int] = option(
        None, "tokens per training block; default 128, lowered if the model has fewer positions")
    line_by_line: bool = option(False, "mlm only: each non-empty line is one example, padded per batch")
    document_boundaries: bool = option(
        False, "keep the texts packed into a block apart: each ends with the tokenizer's end-of-text token (where "
        "the tokenizer adds none), attends only to itself, counts its positions from its own first token, and no "
        "label crosses into the next text")
    chat_template: Optional[str] = option(
        None, "conversational data: a Jinja chat template file that renders each conversation; default: the "
        "tokenizer's own")
    loss_on: Optional[str] = option(
        None, "conversational data: the tokens that carry the loss: the assistant's turns, the completion of "
        "prompt/completion rows, or all; default: assistant for messages, completion for prompt/completion",
        choices=LOSS_RULES)
    no_packing: bool = option(
        False, "conversational data: one conversation per row, padded to the batch's longest, instead of "
        "conversations packed into blocks of --block-size, each attending to itself alone")
    mlm_prob: float = option(0.15, "mlm only: fraction of tokens masked in each batch")
    max_train_samples: Optional[int] = option(None, "use at most this many training blocks")
    max_eval_samples: Optional[int] = option(
        None, "use at most this many validation blocks (with --eval-stride: their tokens)")

    # --- optimisation ---
    optimizer: str = option(
        "adamw", "adamw: torch's AdamW; muon: torch's Muon on the 2-D weights inside transformer layers, AdamW on the "
        "rest (embeddings, head, norms, biases), one --lr for both; sgd: torch's SGD, momentum 0.9",
        choices=OPTIMIZERS)
    lr: float = option(2e-5, f"peak learning rate; with LoRA adapters {LORA_LR_FACTOR}x the task's default")
    head_lr: Optional[float] = option(
        None, "learning rate of parameters the checkpoint lacks (e.g. a fresh MLM head); default: --lr")
    weight_decay: float = option(0.01, "weight decay (decoupled for AdamW and Muon, L2 for SGD; not applied to biases "
                                 "and norm weights)")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    lr_scheduler: str = option(
        "linear", f"learning-rate schedule, as transformers shapes it: {', '.join(SCHEDULES)} (constant has no "
        "warmup, constant_with_warmup has)", choices=SCHEDULES)
    warmup_steps: int = option(0, "linear warmup steps (overrides --warmup-ratio)")
    warmup_ratio: float = option(0.0, "warmup as a fraction of all optimizer steps")
    grad_accum_steps: int = option(1, "micro-batches per optimizer step")
    max_grad_norm: float = option(1.0, "clip gradients to this global norm (0: no clipping)")
    epochs: float = option(1.0, "passes over the training blocks")
    max_train_steps: Optional[int] = option(None, "stop after this many optimizer steps (overrides --epochs)")
    batch_size: int = option(8, "training blocks per micro-batch")
    eval_batch_size: Optional[int] = option(
        None, "blocks (or --eval-stride windows) per evaluation batch; default: --batch-size")
    seed: int = option(42, "seed of the shuffling, the masks, dropout and fresh weights")
    data_seed: Optional[int] = option(None, "seed of the shuffling alone; default: --seed")

    # --- adapters ---
    lora_rank: int = option(
        0, "train LoRA adapters of this rank (peft's format) on a frozen model instead of every weight; 0: off")
    lora_alpha: Optional[float] = option(None, "LoRA's scale numerator (updates are scaled by alpha / rank); "
                                         "default: 2 x --lora-rank")
    lora_dropout: float = option(0.0, "dropout on the adapters' inputs")
    lora_targets: Optional[str] = option(
        None, "comma-separated names of the layers that get adapters (e.g. q_proj,v_proj); default: every "
        "linear layer of the model's body")
    merge_lora: bool = option(
        False, "also write OUTPUT_DIR/merged: the model with the adapters added into its weights, which "
        "from_pretrained loads without peft")

    # --- hardware ---
    device: str = option("auto", "auto: CUDA, then Apple MPS, then CPU", choices=("auto", "cpu", "cuda", "mps"))
    precision: str = option(
        "auto", "auto: bf16 autocast where the hardware runs it natively, else fp32",
        choices=("auto", "fp32", "bf16", "fp16"))
    fsdp: bool = option(False, "under torchrun: shard parameters, gradients and optimizer state (FSDP2)")
    ddp_timeout: int = option(
        1800, "under torchrun: seconds a process waits for the others (e.g. while rank 0 tokenizes) before failing")
    compile: str = option(
        "auto", "torch.compile the model: on, off, or auto: on when the first steps show it pays back within the run "
        "(the step budget x the time it saves per step against the time it takes; where that saving is unknown, a run "
        "10x longer than compiling compiles to measure it; never under --fsdp, nor where a "
        "tiny test kernel fails to build, e.g. without a C++ compiler on a CPU); --compile alone means on",
        choices=("auto", "on", "off"), const="on")
    gradient_checkpointing: bool = option(False, "recompute activations in backward: less memory, ~30% more compute")
    ignore_memory_plan: bool = option(
        False, "start even where the memory plan (printed before anything is loaded) says the run won't fit")
    peak_flops: Union[float, str] = option(
        "auto", "peak FLOP/s of one device, for MFU; auto: a table of known GPUs, else a ~2 s matmul probe at "
        "the run's precision, cached in CACHE_DIR/peak-flops.json", type=_number_or_text)

    # --- evaluation, logging, output ---
    eval_every: Optional[int] = option(None, "also evaluate every N optimizer steps")
    eval_only: bool = option(False, "evaluate --model on the validation data, write metrics, exit")
    eval_stride: Optional[int] = option(
        None, "clm only: validation perplexity over windows of --block-size tokens starting every N tokens "
        "(1 <= N <= block size), each token scored once with the context its window gives (N = block size: the "
        "blocks); default: disjoint blocks")
    log_every: int = option(10, "log training loss every N optimizer steps")
    log_layers: bool = option(
        False, "also log, every --log-every steps, the gradient norm, weight norm and update/weight ratio of the "
        "embeddings, each transformer layer and the head (TensorBoard: grad_norm/, weight_norm/, update_ratio/)")
    skip_spikes: Optional[float] = option(
        None, "don't apply a step whose loss or gradient norm is more than Z standard deviations above the mean of "
        "the last 100 applied steps (judged from the 11th on): weights, optimizer state and schedule go on as if it "
        "never ran; each is logged with its z-scores and counted in metrics.json (skipped_steps)")
    sample_every: Optional[int] = option(
        None, "clm only: every N optimizer steps, greedy-decode 32 tokens after each prompt, to the log and "
        "TensorBoard's text tab")
    sample_prompts: Optional[str] = option(
        None, "prompts for --sample-every: a .txt file (one per line) or .csv/.json/.jsonl (--text-column); "
        "default: the first 16 tokens of the first 3 validation texts")
    output_dir: Optional[str] = option(None, "where the run is written; default runs/<task>-<timestamp>")
    save_gguf: Optional[str] = option(
        None, "clm only: after training, also write OUTPUT_DIR/model-TYPE.gguf for llama.cpp, Ollama or LM Studio "
        "(Llama, Qwen2, Qwen3 and GPT-2 models); TYPE is the weights' type", choices=GGUF_TYPES)
    overwrite_output_dir: bool = option(
        False, "replace the run an --output-dir holds: delete its checkpoints, TensorBoard logs and metrics")
    save_every: Union[int, str, None] = option(
        None, "write a resumable checkpoint every N optimizer steps and at each epoch's end; "
        "'epoch': at each epoch's end only",
        type=lambda text: int(text) if text.lstrip("-").isdigit() else text)  # validated() judges the rest
    save_total_limit: Optional[int] = option(None, "keep only the newest K checkpoints")
    resume_from: Optional[str] = option(
        None, "checkpoint directory to resume from; 'latest': the newest in --output-dir; 'auto': that one if there "
        "is one, else start afresh there (one command line for every restart of a preemptible job)")
    cache_dir: Optional[str] = option(
        None, "cache for converted embedded models and tokenized data; default $LM_CACHE_DIR or ~/.cache/lm")
    preprocessing_workers: Optional[int] = option(None, "processes that tokenize the data; default: the cores")
    prepare_only: bool = option(
        False, "tokenize the data into the cache, print its path and token and block counts, exit")

    @classmethod
    def for_task(cls, task, **overrides) -> "Config":
        """A config with the defaults of `task` (an Objective or its name), then `overrides`, validated."""
        objective = find_objective(task)
        settings = {**objective.defaults, **overrides}
        if "lr" not in overrides and (settings.get("lora_rank") or is_adapter_dir(settings.get("model"))):
            settings["lr"] = LORA_LR_FACTOR * settings.get("lr", cls.lr)  # adapters learn from zero: a larger step
        return cls(task=objective.name, **settings).validated()

    def validated(self) -> "Config":
        """Check everything that needs no model or data; raise UsageError naming the bad setting."""
        def need(ok, message):
            if not ok:
                raise UsageError(message)

        for f in dataclasses.fields(self):  # the CLI checks these too; a Config built in Python is checked here
            choices = f.metadata.get("choices")
            need(choices is None or getattr(self, f.name) in (*choices, f.default),
                 f"--{flag(f.name)} must be one of {', '.join(choices or ())}, got {getattr(self, f.name)!r}")
        need(self.block_size is None or self.block_size > 0,
             f"--block-size must be positive, got {self.block_size}")
        need(0 < self.mlm_prob < 1, f"--mlm-prob must be between 0 and 1 (exclusive), got {self.mlm_prob}")
        for name in ("batch_size", "eval_batch_size", "grad_accum_steps", "max_train_steps", "log_every", "ddp_timeout",
                     "eval_every", "save_total_limit", "max_train_samples", "max_eval_samples",
                     "preprocessing_workers", "eval_stride", "sample_every"):
            value = getattr(self, name)
            need(value is None or value > 0, f"--{flag(name)} must be a positive integer, got {value}")
        for name in ("lr", "head_lr", "epochs", "adam_eps", "skip_spikes"):
            value = getattr(self, name)
            need(value is None or value > 0, f"--{flag(name)} must be positive, got {value}")
        need(self.peak_flops == "auto" or (type(self.peak_flops) is float and self.peak_flops > 0),
             f"--peak-flops must be a positive number or 'auto', got {self.peak_flops!r}")
        need(self.save_every in (None, "epoch") or (type(self.save_every) is int and self.save_every > 0),
             f"--save-every must be a positive integer or 'epoch', got {self.save_every!r}")
        for name in ("seed", "data_seed"):  # NumPy's seed range
            value = getattr(self, name)
            need(value is None or 0 <= value < 2**32, f"--{flag(name)} must be in [0, 2**32 - 1], got {value}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(self.lora_rank >= 0, f"--lora-rank must be >= 0 (0: no adapters), got {self.lora_rank}")
        adapted = self.lora_rank > 0 or is_adapter_dir(self.model)
        for name, value in (("lora_alpha", self.lora_alpha), ("lora_targets", self.lora_targets),
                            ("merge_lora", self.merge_lora or None), ("lora_dropout", self.lora_dropout or None)):
            need(value is None or adapted, f"--{flag(name)} is a setting of LoRA adapters: give --lora-rank R too")
        need(not (self.lora_rank and is_adapter_dir(self.model)),
             f"--model {self.model} holds a LoRA adapter, which brings its own rank and layers: drop --lora-rank")
        need(not (self.eval_only and self.merge_lora and self.lora_rank),
             "--eval-only --merge-lora merges the adapter of --model ADAPTER_DIR; new adapters (--lora-rank) are zero, "
             "with nothing to merge")
        need(self.lora_alpha is None or self.lora_alpha > 0, f"--lora-alpha must be positive, got {self.lora_alpha}")
        need(0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        need(self.lora_targets is None or all(t.strip() for t in self.lora_targets.split(",")),
             f"--lora-targets must name layers, comma-separated, got {self.lora_targets!r}")
        need(not (self.fsdp and adapted), "--fsdp with LoRA adapters is not supported: the adapters and their "
             "optimizer state are small, so train them under torchrun without --fsdp (DDP)")
        need(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "--adam-beta1/2 must be in [0, 1)")
        need(self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        need(0 <= self.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        need(self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {self.max_grad_norm}")
        need(self.lr_scheduler != "polynomial" or self.lr > 1e-7,
             f"--lr-scheduler polynomial decays to 1e-07: --lr must be above that, got {self.lr}")
        need(0 < self.validation_split_percentage < 100,
             f"--validation-split-percentage must be in (0, 100), got {self.validation_split_percentage}")
        need(self.eval_stride is None or self.block_size is None or self.eval_stride <= self.block_size,
             f"--eval-stride {self.eval_stride} is above --block-size {self.block_size}: a window would skip tokens")
        need(not (self.document_boundaries and self.line_by_line),
             "--document-boundaries keeps the texts of a block apart; --line-by-line examples are one text each "
             "already")
        need(not (self.prepare_only and self.line_by_line),
             "--prepare-only caches concatenated blocks; --line-by-line examples are not cached")
        self._check_scratch(need)
        need(not (self.skip_spikes and self.precision == "fp16"), "--skip-spikes with --precision fp16: fp16's "
             "gradient scaler skips the steps that overflow itself, and would count a skipped step as one that "
             "didn't; use bf16 or fp32")
        need(not (self.sample_prompts and not self.sample_every), "--sample-prompts are for --sample-every N: give it too")
        need(not (self.sample_every and self.fsdp), "--sample-every decodes with the whole model on one process, "
             "and --fsdp shards it over all of them: sample from the saved model instead")
        need(not (self.dataset and self.train_file), "give either --dataset or --train-file, not both")
        need(not (self.validation_file and not self.train_file), "--validation-file needs --train-file")
        need(not (self.dataset_config and not self.dataset), "--dataset-config needs --dataset")
        need(self.resume_from != "auto" or self.output_dir, "--resume-from auto resumes the run of --output-dir, "
             "or starts it there: give --output-dir (the default is a new directory each time)")
        need(not (self.eval_only and self.resume_from),
             "--eval-only evaluates --model and trains nothing; to evaluate a checkpoint's run, let it finish "
             "and pass its output dir as --model")
        objective = find_objective(self.task)
        need(not (self.save_gguf and objective.model_class != "AutoModelForCausalLM"),
             f"--save-gguf writes a causal model, which is what llama.cpp runs; {objective.name} trains a "
             f"{objective.description}")
        need(not (self.save_gguf and self.eval_only), "--save-gguf writes the model a run trained; to convert "
             "--model without training: python -m lm.gguf DIR --type TYPE")
        if objective.check:
            objective.check(self)
        return self

    def _check_scratch(self, need) -> None:
        """The settings of a model from scratch (--model-type, --config-name, --config-overrides)."""
        need(self.config_overrides is None or self.from_scratch, "--config-overrides sets the configuration of a "
             "model from scratch: give --model-type or --config-name too")
        if not self.from_scratch:
            return
        scratch = "--model-type" if self.model_type else "--config-name"
        need(not (self.model_type and self.config_name), "--model-type and --config-name both name the configuration "
             "of a model from scratch: give one")
        need(not self.model, f"--model loads trained weights, {scratch} starts from fresh ones: give one")
        split_overrides(self.config_overrides or "")  # its syntax; the values are typed once the configuration loads
        need(not (self.model_type and not self.tokenizer), f"--model-type {self.model_type} brings no tokenizer: "
             "name one with --tokenizer (a directory, a Hub name, or smollm2-135m-instruct)")
        need(not self.lora_rank, f"{scratch} starts from fresh weights, and LoRA adapts a trained model: train every "
             "weight (drop --lora-rank)")
        need(not self.eval_only, f"{scratch} starts from fresh weights, and --eval-only evaluates a trained --model")

    @property
    def from_scratch(self) -> bool:
        """Whether the run builds its model from a configuration, with fresh weights."""
        return bool(self.model_type or self.config_name)

    @property
    def data_source(self) -> str:
        """'files', 'hub' or 'embedded'."""
        return "files" if self.train_file else "hub" if self.dataset else "embedded"

    @property
    def shuffle_seed(self) -> int:
        """The seed of the training data's order."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def save_steps(self) -> Optional[int]:
        """Optimizer steps between checkpoints, or None. Any --save-every also saves at each epoch's end."""
        return None if self.save_every == "epoch" else self.save_every

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def split_overrides(text: str) -> dict[str, str]:
    """--config-overrides' KEY=VALUE,... as {KEY: VALUE} (the values typed later, by the configuration's fields)."""
    overrides = {}
    for item in text.split(",") if text else []:
        key, equals, value = item.partition("=")
        if not (equals and key.strip().isidentifier() and value.strip()):
            raise UsageError(f"--config-overrides {text}: {item!r} is not KEY=VALUE (e.g. "
                             "num_hidden_layers=4,hidden_size=256)")
        overrides[key.strip()] = value.strip()
    return overrides


def is_adapter_dir(path) -> bool:
    """Whether `path` names a directory holding a peft adapter (adapter_config.json) rather than a model."""
    return path is not None and os.path.isfile(os.path.join(path, "adapter_config.json"))


def find_objective(task):
    """The Objective of `task`: itself, or the one registered under that name (lm.objectives)."""
    from lm import objectives

    return task if isinstance(task, objectives.Objective) else objectives.find(task)


def flag(name: str) -> str:
    return name.replace("_", "-")


class _Ignored(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        pass


class _Refused(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        raise UsageError(f"{option_string} is not supported: {hf_flags.HF_REFUSED[option_string[2:]]}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise UsageError(f"{message} (see --help)")


def build_parser(task, defaults: bool = True) -> argparse.ArgumentParser:
    """The CLI of a task (an Objective or its name), generated from the Config fields and its defaults.

    With defaults=False, a flag not given is left out of the result (parse_args() fills in the defaults)."""
    objective = find_objective(task)
    parser = _Parser(
        description=f"Fine-tune a {objective.description}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False)  # a prefix such as --output would be ambiguous between --output-dir and --output_dir
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if not f.metadata.get("cli", True):
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X] -> X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        default = objective.defaults.get(f.name, f.default) if defaults else argparse.SUPPRESS
        kwargs = dict(default=default, help=f.metadata["help"].replace("%", "%%"), dest=f.name)  # argparse %-formats help
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = f.metadata.get("type", kind)
            kwargs["metavar"] = f.name.split("_")[-1].upper()
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            if "const" in f.metadata:  # the flag alone means this value
                kwargs.update(nargs="?", const=f.metadata["const"])
        parser.add_argument(f"--{flag(f.name)}", **kwargs)
        hidden = dict(kwargs, help=argparse.SUPPRESS, default=argparse.SUPPRESS)  # the default is set once, above
        if kind is bool:
            hidden.update(action="store", nargs="?", const=True, type=hf_flags.true_or_false)
        for hf in [hf for hf, name in hf_flags.HF_ALIASES.items() if name == f.name]:
            parser.add_argument(f"--{hf}", **hidden)
    for hf, kind in hf_flags.TRAINER_FLAGS.items():
        old_names = [old for old, new in hf_flags.TRAINER_OLD_NAMES.items() if new == hf]
        spellings = [f"--{name}" for name in [hf, *old_names]]
        if kind is bool:
            kwargs = dict(nargs="?", const=True, type=hf_flags.true_or_false)
        else:
            kwargs = dict(nargs="+") if kind is list else dict(type=kind)
        parser.add_argument(*spellings, dest=hf_flags.TRAINER + hf, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                            **kwargs)
    # with or without a value: a switch, `--prediction_loss_only True`, `--dataloader_num_workers 4`
    for hf in hf_flags.HF_IGNORED:
        parser.add_argument(f"--{hf}", action=_Ignored, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for hf in hf_flags.HF_REFUSED:  # with or without a value, so the message names the flag, not a stray argument
        parser.add_argument(f"--{hf}", action=_Refused, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def options_table() -> str:
    """The table of options in docs/options.md, made from the Config fields: flag, default (and the tasks' own), help."""
    from lm import objectives

    def shown(value):
        return "—" if value is None else "off" if value is False else str(value)

    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(Config):
        if not f.metadata.get("cli", True):
            continue
        own = [f"{o.name}: {shown(o.defaults[f.name])}" for o in (objectives.CLM, objectives.MLM)
               if f.name in o.defaults and o.defaults[f.name] != f.default]
        default = shown(f.default) + (f" ({', '.join(own)})" if own else "")
        rows.append(f"| `--{flag(f.name)}` | {default} | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"


def parse_args(task, argv=None) -> Config:
    """Parse the command line of a task (an Objective or its name) into a validated Config."""
    # without defaults: a TrainingArguments flag must tell our flag given from our default to see a conflict
    given = vars(build_parser(task, defaults=False).parse_args(sys.argv[1:] if argv is None else argv))
    theirs = {name[len(hf_flags.TRAINER):]: value for name, value in given.items() if name.startswith(hf_flags.TRAINER)}
    ours = {name: value for name, value in given.items() if not name.startswith(hf_flags.TRAINER)}
    return Config.for_task(task, **{**ours, **hf_flags.from_trainer(theirs, ours)})
