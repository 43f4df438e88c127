"""Command lines of Hugging Face's scripts, run here unchanged: the flags of run_{clm,mlm}_no_trainer.py and the
TrainingArguments of run_{clm,mlm}.py, what each becomes in the Config (lm.config builds them into the CLI,
hidden from --help), and the ones that change nothing here or are refused, with why. docs/huggingface.md lists
them. The Config's fields and values appear here by name only: lm.config depends on this module, not the reverse."""

from __future__ import annotations

import argparse

from lm.errors import UsageError

# Their flags that are other spellings of our fields (--seed is spelled alike):
HF_ALIASES = {
    "model_name_or_path": "model",
    "tokenizer_name": "tokenizer",
    "model_type": "model_type",
    "config_name": "config_name",
    "config_overrides": "config_overrides",
    "dataset_name": "dataset",
    "dataset_config_name": "dataset_config",
    "train_file": "train_file",
    "validation_file": "validation_file",
    "validation_split_percentage": "validation_split_percentage",
    "block_size": "block_size",
    "max_seq_length": "block_size",  # the MLM script's name
    "line_by_line": "line_by_line",
    "mlm_probability": "mlm_prob",
    "max_train_samples": "max_train_samples",
    "max_eval_samples": "max_eval_samples",
    "learning_rate": "lr",
    "weight_decay": "weight_decay",
    "adam_beta1": "adam_beta1",
    "adam_beta2": "adam_beta2",
    "adam_epsilon": "adam_eps",
    "lr_scheduler_type": "lr_scheduler",
    "num_warmup_steps": "warmup_steps",
    "warmup_ratio": "warmup_ratio",  # TrainingArguments before transformers 5
    "gradient_accumulation_steps": "grad_accum_steps",
    "max_grad_norm": "max_grad_norm",
    "num_train_epochs": "epochs",
    "max_train_steps": "max_train_steps",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "data_seed": "data_seed",
    "gradient_checkpointing": "gradient_checkpointing",
    "output_dir": "output_dir",
    "overwrite_output_dir": "overwrite_output_dir",
    "checkpointing_steps": "save_every",
    "save_total_limit": "save_total_limit",
    "resume_from_checkpoint": "resume_from",
    "preprocessing_num_workers": "preprocessing_workers",
    "ddp_timeout": "ddp_timeout",
}


def true_or_false(text: str) -> bool:
    # the spellings HfArgumentParser takes: HF users write `--bf16 True` (and `--line_by_line True`, a type=bool flag)
    if text.lower() not in ("true", "false", "yes", "no", "t", "f", "y", "n", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return text.lower() in ("true", "yes", "t", "y", "1")


def _steps(text: str) -> int:
    """A TrainingArguments interval: a whole number of optimizer steps (not their fraction of the run)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None and 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is a fraction of the run, which lm does not take: give a number "
                                         "of optimizer steps (a run prints how many it has)")
    if value is None or value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number of optimizer steps, got {text!r}")
    return int(value)


def _steps_or_fraction(text: str) -> float:
    """TrainingArguments' warmup_steps: a number of steps, or below 1 a fraction of them."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0 or (value >= 1 and value != int(value)):
        raise argparse.ArgumentTypeError(f"expected a whole number of steps or a fraction below 1, got {text!r}")
    return value


# TrainingArguments whose meaning here is more than another name: parsed as spelled (bool: a switch that takes
# HF's True/False too; list: one or more values; else the type of one value), then turned into Config values by
# from_trainer().
TRAINER_FLAGS = {
    "do_train": bool, "do_eval": bool, "use_cpu": bool, "bf16": bool, "fp16": bool, "tf32": bool,
    "torch_compile": bool, "max_steps": int, "warmup_steps": _steps_or_fraction, "logging_steps": _steps,
    "logging_strategy": str, "eval_strategy": str, "eval_steps": _steps, "save_strategy": str, "save_steps": _steps,
    "optim": str, "report_to": list,
}
TRAINER_OLD_NAMES = {"no_cuda": "use_cpu", "evaluation_strategy": "eval_strategy"}  # before transformers 5
TRAINER = "trainer."  # the prefix of their dests
# optim values that are AdamW with fp32 state, as lm's (fused or not: lm takes the fused kernel where there is one)
ADAMW_NAMES = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_apex_fused", "adamw_torch_xla",
               "adamw_torch_npu_fused")
HF_INTERVAL = 500  # TrainingArguments' default logging_steps and save_steps


def from_trainer(theirs: dict, ours: dict) -> dict:
    """The Config values the TrainingArguments in `theirs` (as parsed, by name) ask for.

    `ours` holds the values our own flags and HF_ALIASES give; where one of them says otherwise, or the
    TrainingArguments contradict each other, the user gets a UsageError.
    """
    wanted = {}  # Config field -> (value, the flags that ask for it)
    if "do_train" in theirs or "do_eval" in theirs:  # with neither: lm's run, which trains and evaluates
        train, evaluate = theirs.get("do_train", False), theirs.get("do_eval", False)
        if not (train or evaluate):
            raise UsageError("--do_train and --do_eval are both off, which leaves nothing to do: --do_train trains "
                             "(and evaluates), --do_eval alone evaluates --model")
        wanted["eval_only"] = (not train, "--do_train" if train else "--do_eval without --do_train")
    if theirs.get("use_cpu"):
        wanted["device"] = ("cpu", "--use_cpu")
    if "bf16" in theirs or "fp16" in theirs:
        if theirs.get("bf16") and theirs.get("fp16"):
            raise UsageError("--bf16 and --fp16 ask for two precisions: give one")
        asked = next((name for name in ("bf16", "fp16") if theirs.get(name)), None)
        # without either, run_clm.py trains in fp32
        wanted["precision"] = (asked or "fp32", f"--{asked}" if asked else "--bf16/--fp16 False")
    if theirs.get("tf32") is False:
        raise UsageError("--tf32 False: lm always lets CUDA GPUs run fp32 matmuls in TF32, and has no switch to "
                         "turn that off; leave --tf32 out")
    if "torch_compile" in theirs:
        wanted["compile"] = ("on" if theirs["torch_compile"] else "off", f"--torch_compile {theirs['torch_compile']}")
    if theirs.get("max_steps", -1) > 0:  # TrainingArguments' -1 (or 0): as many as the epochs take
        wanted["max_train_steps"] = (theirs["max_steps"], f"--max_steps {theirs['max_steps']}")
    if "warmup_steps" in theirs:
        value = theirs["warmup_steps"]
        wanted["warmup_ratio" if 0 < value < 1 else "warmup_steps"] = (
            value if 0 < value < 1 else int(value), f"--warmup_steps {value:g}")
    if theirs.get("logging_strategy", "steps") != "steps":
        raise UsageError(f"--logging_strategy {theirs['logging_strategy']}: lm logs every --log-every "
                         "(--logging_steps) optimizer steps")
    if "logging_steps" in theirs:
        wanted["log_every"] = (theirs["logging_steps"], f"--logging_steps {theirs['logging_steps']}")
    wanted.update(_evaluation(theirs, theirs.get("logging_steps", ours.get("log_every", HF_INTERVAL))))
    wanted.update(_saving(theirs))
    if theirs.get("optim", "adamw_torch") not in ADAMW_NAMES:
        raise UsageError(f"--optim {theirs['optim']}: lm trains with torch's AdamW, Muon or SGD (--optimizer "
                         "adamw|muon|sgd), or one given to train(); leave --optim out or give adamw_torch")
    for name in [name for value in theirs.get("report_to", ()) for name in value.split(",")]:
        if name not in ("tensorboard", "all", "none"):  # lm writes TensorBoard logs even with none: they're local
            raise UsageError(f"--report_to {name}: lm logs to TensorBoard only (OUTPUT_DIR/logs); leave --report_to "
                             "out or give tensorboard")
    for name, (value, asked_by) in wanted.items():
        if name in ours and ours[name] != value:
            ours_said = f"--{name.replace('_', '-')}" + ("" if ours[name] is True else f" {ours[name]}")
            raise UsageError(f"{asked_by} and {ours_said} disagree: give one")
    return {name: value for name, (value, _) in wanted.items()}


def _evaluation(theirs: dict, logging_steps: int) -> dict:
    """eval_strategy and eval_steps as from_trainer() wants them. lm evaluates at each epoch's end anyway."""
    strategy = theirs.get("eval_strategy")
    if strategy not in (None, "no", "steps", "epoch"):
        raise UsageError(f"--eval_strategy {strategy}: lm evaluates every --eval-every steps and at each epoch's "
                         "end; give no, steps or epoch")
    if strategy is None:  # TrainingArguments' "no": --eval_steps alone evaluates nothing there either
        return {}
    steps = theirs.get("eval_steps", logging_steps)  # run_clm.py falls back to the logging interval
    return {"eval_every": (steps if strategy == "steps" else None, f"--eval_strategy {strategy}")}


def _saving(theirs: dict) -> dict:
    """save_strategy and save_steps as from_trainer() wants them. Without either lm saves no checkpoints
    (run_clm.py every 500 steps)."""
    strategy = theirs.get("save_strategy", "steps" if "save_steps" in theirs else None)
    if strategy == "best":
        raise UsageError("--save_strategy best: lm keeps no best model; --save_total_limit keeps the newest "
                         "checkpoints, and OUTPUT_DIR/logs every evaluation")
    if strategy not in (None, "no", "steps", "epoch"):
        raise UsageError(f"--save_strategy {strategy}: give no, steps or epoch")
    if strategy is None:
        return {}
    every = {"no": None, "steps": theirs.get("save_steps", HF_INTERVAL), "epoch": "epoch"}[strategy]
    steps = strategy == "steps" and "save_steps" in theirs
    return {"save_every": (every, f"--save_steps {every}" if steps else f"--save_strategy {strategy}")}


# Their flags that change nothing here, and why.
HF_IGNORED = {
    "with_tracking": "lm always logs to TensorBoard",
    "low_cpu_mem_usage": "transformers always loads weights that way now",
    "prediction_loss_only": "lm's evaluation computes the loss alone",
    "do_predict": "run_clm.py and run_mlm.py predict nothing either",
    "eval_on_start": "lm always evaluates before training (perplexity_before)",
    "dataloader_num_workers": "a batch is cut from token blocks the training process holds in memory: worker "
                              "processes would cost more than they save; --preprocessing-workers tokenizes in "
                              "parallel",
    "dataloader_pin_memory": "the batches are small token ids, copied to the device as they come",
    "remove_unused_columns": "lm keeps the text column alone",
    "ignore_data_skip": "a resumed run starts at its example without reading the ones before it",
}
# Their options we don't implement, and what to do instead.
HF_REFUSED = {
    "use_slow_tokenizer": "lm uses the tokenizer as saved: save the one you want and pass --tokenizer DIR",
    "trust_remote_code": "lm loads only architectures that transformers implements",
    "overwrite_cache": "the token cache is keyed by the tokenizer and the data, so it is never stale; "
                       "delete CACHE_DIR/tokens to rebuild it",
    "no_keep_linebreaks": "lm keeps the newline of each .txt line; give the texts as .jsonl or .csv to drop them",
    "pad_to_max_length": "lm pads each batch to its longest example only",
    "push_to_hub": "upload OUTPUT_DIR yourself with huggingface-cli upload",
    "hub_model_id": "upload OUTPUT_DIR yourself with huggingface-cli upload",
    "hub_token": "log in with huggingface-cli login, then upload OUTPUT_DIR with huggingface-cli upload",
    "hub_strategy": "upload OUTPUT_DIR yourself with huggingface-cli upload",
    "logging_dir": "lm writes TensorBoard logs to OUTPUT_DIR/logs",
    "run_name": "a run is named by its --output-dir",
    "load_best_model_at_end": "lm keeps the last model; OUTPUT_DIR/logs holds every evaluation and "
                              "checkpoints/step-N each saved model",
    "metric_for_best_model": "lm keeps the last model; OUTPUT_DIR/logs holds every evaluation",
    "lr_scheduler_kwargs": "lm's schedules take transformers' default settings; choose one with --lr-scheduler",
    "optim_args": "lm's AdamW takes --adam-beta1, --adam-beta2, --adam-eps and --weight-decay; another optimizer "
                  "plugs into train(optimizer=...)",
    "torch_compile_backend": "lm compiles with Inductor; --compile on|off|auto",
    "torch_compile_mode": "lm chooses the mode (reduce-overhead on CUDA); --compile on|off|auto",
    "bf16_full_eval": "evaluation runs at the training's --precision, over fp32 weights",
    "fp16_full_eval": "evaluation runs at the training's --precision, over fp32 weights",
    "auto_find_batch_size": "choose --batch-size; --grad-accum-steps keeps the global batch with a smaller one",
    "label_smoothing_factor": "lm trains on plain cross-entropy; examples/ shows how to give a task its own loss",
    "deepspeed": "under torchrun, --fsdp shards parameters, gradients and optimizer state",
    "fsdp_config": "lm's --fsdp takes no settings: FSDP2 over each transformer layer",
    "local_rank": "launch with torchrun, which passes each process its rank in the environment",
}
