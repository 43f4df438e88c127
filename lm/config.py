"""Every option of a run in one dataclass; the command line is generated from it."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from typing import Optional

from lm.errors import UsageError

EMBEDDED_CORPUS = "python-docs"


def option(default, help, **meta):
    """A config field whose help text (and optional `choices`, `cli=False`) feeds the CLI."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class Config:
    """All settings of a fine-tuning run. Defaults that depend on the task are filled in by `for_task`."""

    task: str = option("clm", "clm (causal LM) or mlm (masked LM); set by the entry script", cli=False)

    # --- model and data ---
    model: Optional[str] = option(
        None, "model directory or Hub name; default: the embedded model of the task "
        "(clm: smollm2-135m-instruct, mlm: all-minilm-l6-v2)")
    dataset: Optional[str] = option(
        None, f"Hub dataset name (e.g. wikitext); default: the embedded corpus '{EMBEDDED_CORPUS}' "
        "unless --train-file is given")
    dataset_config: Optional[str] = option(None, "Hub dataset configuration (e.g. wikitext-2-raw-v1)")
    train_file: Optional[str] = option(None, "training text: .txt (one text per line), .csv, .json or .jsonl")
    validation_file: Optional[str] = option(None, "validation text, same formats as --train-file")
    text_column: str = option("text", "column holding the text in .csv/.json/.jsonl files and Hub datasets")
    validation_split_percentage: float = option(
        5.0, "percent of the training texts held out when there is no validation split")
    block_size: Optional[int] = option(
        None, "tokens per training block; default 128, lowered if the model has fewer positions")
    line_by_line: bool = option(False, "mlm only: each non-empty line is one example, padded per batch")
    mlm_prob: float = option(0.15, "mlm only: fraction of tokens masked in each batch")
    max_train_samples: Optional[int] = option(None, "use at most this many training blocks")
    max_eval_samples: Optional[int] = option(None, "use at most this many validation blocks")

    # --- optimisation ---
    lr: float = option(2e-5, "peak learning rate of AdamW")
    head_lr: Optional[float] = option(
        None, "learning rate of parameters the checkpoint lacks (e.g. a fresh MLM head); default: --lr")
    weight_decay: float = option(0.01, "AdamW weight decay (not applied to biases and norm weights)")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    lr_scheduler: str = option("linear", "learning-rate schedule after warmup",
                               choices=("linear", "cosine", "constant"))
    warmup_steps: int = option(0, "linear warmup steps (overrides --warmup-ratio)")
    warmup_ratio: float = option(0.0, "warmup as a fraction of all optimizer steps")
    grad_accum_steps: int = option(1, "micro-batches per optimizer step")
    max_grad_norm: float = option(1.0, "clip gradients to this global norm (0: no clipping)")
    epochs: float = option(1.0, "passes over the training blocks")
    max_train_steps: Optional[int] = option(None, "stop after this many optimizer steps (overrides --epochs)")
    batch_size: int = option(8, "training blocks per micro-batch")
    eval_batch_size: Optional[int] = option(None, "blocks per evaluation batch; default: --batch-size")
    seed: int = option(42, "seed of the shuffling, the masks, dropout and fresh weights")

    # --- hardware ---
    device: str = option("auto", "auto: CUDA, then Apple MPS, then CPU", choices=("auto", "cpu", "cuda", "mps"))
    precision: str = option(
        "auto", "auto: bf16 autocast where the hardware runs it natively, else fp32",
        choices=("auto", "fp32", "bf16", "fp16"))
    fsdp: bool = option(False, "under torchrun: shard parameters, gradients and optimizer state (FSDP2)")
    compile: bool = option(False, "torch.compile the model (slow first steps; pays off on long GPU runs)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward: less memory, ~30% more compute")
    peak_flops: Optional[float] = option(
        None, "peak FLOP/s of one device, for MFU; default: a table of known GPUs (none for CPUs)")

    # --- evaluation, logging, output ---
    eval_every: Optional[int] = option(None, "also evaluate every N optimizer steps")
    eval_only: bool = option(False, "evaluate --model on the validation data, write metrics, exit")
    log_every: int = option(10, "log training loss every N optimizer steps")
    output_dir: Optional[str] = option(None, "where the run is written; default runs/<task>-<timestamp>")
    overwrite_output_dir: bool = option(False, "allow an --output-dir that holds another run's checkpoints")
    save_every: Optional[int] = option(None, "write a resumable checkpoint every N optimizer steps")
    save_total_limit: Optional[int] = option(None, "keep only the newest K checkpoints")
    resume_from: Optional[str] = option(None, "checkpoint directory to resume from, or 'latest'")
    cache_dir: Optional[str] = option(
        None, "cache for converted embedded models and tokenized data; default $LM_CACHE_DIR or ~/.cache/lm")
    preprocessing_workers: Optional[int] = option(None, "processes that tokenize the data; default: the cores")
    prepare_only: bool = option(
        False, "tokenize the data into the cache, print its path and token and block counts, exit")

    @classmethod
    def for_task(cls, task: str, **overrides) -> "Config":
        """A config with the task's defaults, then `overrides`, validated."""
        defaults = TASK_DEFAULTS[task]
        return cls(task=task, **{**defaults, **overrides}).validated()

    def validated(self) -> "Config":
        """Check everything that needs no model or data; raise UsageError naming the bad setting."""
        def need(ok, message):
            if not ok:
                raise UsageError(message)

        need(self.task in TASK_DEFAULTS, f"unknown task {self.task!r}: use clm or mlm")
        need(self.block_size is None or self.block_size > 0,
             f"--block-size must be positive, got {self.block_size}")
        need(0 < self.mlm_prob < 1, f"--mlm-prob must be between 0 and 1 (exclusive), got {self.mlm_prob}")
        need(not (self.line_by_line and self.task == "clm"),
             "--line-by-line is for masked LM only: causal LM trains on concatenated blocks")
        for name in ("batch_size", "eval_batch_size", "grad_accum_steps", "max_train_steps", "log_every",
                     "eval_every", "save_every", "save_total_limit", "max_train_samples", "max_eval_samples",
                     "preprocessing_workers"):
            value = getattr(self, name)
            need(value is None or value > 0, f"--{flag(name)} must be a positive integer, got {value}")
        for name in ("lr", "head_lr", "epochs", "adam_eps"):
            value = getattr(self, name)
            need(value is None or value > 0, f"--{flag(name)} must be positive, got {value}")
        need(0 <= self.seed < 2**32, f"--seed must be in [0, 2**32 - 1], got {self.seed}")  # NumPy's seed range
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "--adam-beta1/2 must be in [0, 1)")
        need(self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        need(0 <= self.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        need(self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {self.max_grad_norm}")
        need(0 < self.validation_split_percentage < 100,
             f"--validation-split-percentage must be in (0, 100), got {self.validation_split_percentage}")
        need(not (self.prepare_only and self.line_by_line),
             "--prepare-only caches concatenated blocks; --line-by-line examples are not cached")
        need(not (self.dataset and self.train_file), "give either --dataset or --train-file, not both")
        need(not (self.validation_file and not self.train_file), "--validation-file needs --train-file")
        need(not (self.dataset_config and not self.dataset), "--dataset-config needs --dataset")
        return self

    @property
    def data_source(self) -> str:
        """'files', 'hub' or 'embedded'."""
        return "files" if self.train_file else "hub" if self.dataset else "embedded"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# What the two entry scripts change. Half an epoch of the embedded corpus keeps the CLM quick start
# near 10 minutes on 2 CPU cores (SmolLM2-135M: ~11 s per fp32 step of 8 x 128 tokens). The MLM head of the embedded MiniLM is absent from its
# checkpoint, so it starts random and needs a far larger step size than the pretrained body.
TASK_DEFAULTS = {
    "clm": dict(epochs=0.5),
    "mlm": dict(lr=1e-4, head_lr=1e-3, epochs=3.0),
}


def flag(name: str) -> str:
    return name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise UsageError(f"{message} (see --help)")


def build_parser(task: str) -> argparse.ArgumentParser:
    """The CLI of a task, generated from the Config fields."""
    parser = _Parser(
        prog=f"train_{task}.py",
        description=f"Fine-tune a {'causal' if task == 'clm' else 'masked'} language model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(Config)
    defaults = TASK_DEFAULTS[task]
    for f in dataclasses.fields(Config):
        if not f.metadata.get("cli", True):
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X] -> X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        default = defaults.get(f.name, f.default)
        kwargs = dict(default=default, help=f.metadata["help"].replace("%", "%%"), dest=f.name)  # argparse %-formats help
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = kind
            kwargs["metavar"] = f.name.split("_")[-1].upper()
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(f"--{flag(f.name)}", **kwargs)
    return parser


def parse_args(task: str, argv=None) -> Config:
    """Parse the command line of a task into a validated Config."""
    args = build_parser(task).parse_args(sys.argv[1:] if argv is None else argv)
    return Config(task=task, **vars(args)).validated()
