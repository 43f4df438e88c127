"""The training loop, top to bottom: settings, data, model, optimizer, then the steps."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import threading
import sys
import time
from datetime import datetime
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lm import checkpoint
from lm.config import Config
from lm.data import EpochSampler
from lm.embedded import cache_root
from lm.errors import UsageError
from lm.hardware import autocast, choose_precision, configure, native_bf16, resolve_device
from lm.masking import IGNORE
from lm.modeling import load_config, load_model, load_tokenizer, max_positions, resolve_block_size, resolve_model
from lm.objectives import TokenLoss, make_collator
from lm.optim import build_optimizer, build_scheduler, parameter_groups
from lm.token_cache import load_examples, load_sources

# Options that fix which batches a run sees; a resumed run must keep them to stay exact.
RESUME_FIXED = ("task", "model", "dataset", "dataset_config", "train_file", "validation_file", "block_size",
                "line_by_line", "mlm_prob", "max_train_samples", "batch_size", "grad_accum_steps", "seed")


def train(cfg: Config, *, model=None, tokenizer=None, loss=TokenLoss) -> dict:
    """Fine-tune as `cfg` says and return the metrics also written to OUTPUT_DIR/metrics.json.

    `model` and `tokenizer` replace what `cfg.model` names. `loss` wraps the model into a module
    whose forward(input_ids, attention_mask, labels) returns the summed loss over labelled tokens.
    """
    cfg = cfg.validated()
    model_name = cfg.model or ("custom" if model is not None else None)
    seed_everything(cfg.seed)

    # -- everything that needs no model is checked first, so mistakes cost seconds
    device = resolve_device(cfg.device)
    configure(device)
    precision, precision_why = choose_precision(cfg.precision, device.type, native_bf16(device))
    out = Path(cfg.output_dir or f"runs/{cfg.task}-{datetime.now():%Y%m%d-%H%M%S}")
    resume = checkpoint.resolve(cfg.resume_from, out) if cfg.resume_from else None
    check_output_dir(out, cfg, resume)
    sources = load_sources(cfg)

    # -- tokenizer and blocks
    if tokenizer is None:
        path, extra = resolve_model(cfg.model, cfg.task, cfg.cache_dir)
        tokenizer = load_tokenizer(path, extra, cfg.task)
        model_config = model.config if model is not None else load_config(path, extra)
    else:
        model_config = model.config
    block_size, note = resolve_block_size(cfg.block_size, max_positions(model_config, tokenizer))
    if note:
        print(f"warning: {note}", file=sys.stderr)
    train_set, eval_set = load_examples(cfg, sources, tokenizer, block_size, cache_root(cfg.cache_dir))
    if cfg.prepare_only:
        return {"train_blocks": len(train_set), "validation_blocks": len(eval_set)}

    # -- model, loss, optimizer, schedule
    fresh = frozenset()
    if model is None:
        model, fresh = load_model(path, extra, cfg.task)
        model_name = cfg.model or path
    model.to(device)
    module = loss(model).to(device)
    groups = parameter_groups(model, cfg.lr, cfg.weight_decay, fresh, cfg.head_lr)
    optimizer = build_optimizer(groups, cfg, device)
    batches_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum_steps)
    total_steps = cfg.max_train_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = build_scheduler(optimizer, total_steps, warmup, cfg.lr_scheduler)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    sampler = EpochSampler(len(train_set), cfg.seed)
    collate = make_collator(cfg.task, tokenizer, cfg.mlm_prob, cfg.seed)
    # Private generators: a DataLoader otherwise draws its base seed from the global RNG at every
    # iter(), which would shift dropout after a resume mid-epoch.
    train_loader = DataLoader(train_set, cfg.batch_size, sampler=sampler, collate_fn=collate,
                              generator=torch.Generator())
    eval_loader = DataLoader(eval_set, cfg.eval_batch_size or cfg.batch_size, shuffle=False,
                             collate_fn=make_collator(cfg.task, tokenizer, cfg.mlm_prob, cfg.seed, evaluation=True),
                             generator=torch.Generator())

    # -- where the run stands: fresh, or exactly where a checkpoint left it
    progress = {"step": 0, "epoch": 0, "batches_done": 0, "perplexity_before": None,
                "window": {"loss_sum": 0.0, "tokens": 0, "inputs": 0, "seconds": 0.0},
                "train_tokens": 0, "train_seconds": 0.0}
    if resume is not None:
        progress = restore(resume, cfg, model_name, model, optimizer, scheduler, scaler)
    elif cfg.overwrite_output_dir:
        for old in checkpoint.all_checkpoints(out):
            shutil.rmtree(old)

    print(f"model {model_name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"
          + (f", {len(fresh)} freshly initialised tensors (lr {cfg.head_lr or cfg.lr:g})" if fresh else ""))
    print(f"device {device}, precision {precision} ({precision_why})")
    print(f"data: {len(train_set)} train / {len(eval_set)} validation examples of <= {block_size} tokens; "
          f"{cfg.batch_size * cfg.grad_accum_steps} examples per step, {total_steps} steps, output {out}")

    out.mkdir(parents=True, exist_ok=True)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(out / "logs", purge_step=progress["step"] + 1 if resume else None)
    if resume is None:
        writer.add_text("config", "```\n" + json.dumps({**cfg.to_dict(), "precision": precision}, indent=2) + "\n```")

    def run_evaluation(step: int) -> float:
        loss_value = evaluate(module, eval_loader, device, precision)
        writer.add_scalar("eval/loss", loss_value, step)
        writer.add_scalar("eval/perplexity", perplexity(loss_value), step)
        return loss_value

    if cfg.eval_only:
        eval_loss = run_evaluation(0)
        metrics = {"eval_loss": eval_loss, "perplexity": perplexity(eval_loss), "eval_tokens": eval_set.num_tokens,
                   "precision": precision, "model": model_name}
        write_json(out / "metrics.json", metrics)
        print(f"perplexity: {perplexity(eval_loss):.4f}")
        writer.close()
        return metrics

    if progress["perplexity_before"] is None:
        progress["perplexity_before"] = perplexity(run_evaluation(0))
        print(f"perplexity before training: {progress['perplexity_before']:.3f}")

    def save_checkpoint() -> Path:
        state = {**progress, "task": cfg.task, "model": model_name, "config": cfg.to_dict()}
        return checkpoint.save(out, state, model, optimizer, scheduler, scaler, cfg.save_total_limit)

    # -- the loop
    step, window = progress["step"], progress["window"]
    last_eval = eval_loss = None
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", dynamic_ncols=True)
    module.train()
    with StopOnSignal() as stop:
        while step < total_steps:
            sampler.set_epoch(progress["epoch"], start=progress["batches_done"] * cfg.batch_size)
            collate.epoch = progress["epoch"]
            batches = iter(train_loader)
            while step < total_steps:
                started = time.perf_counter()
                micro = list(islice(batches, cfg.grad_accum_steps))
                if not micro:
                    break
                # One optimizer step. Each micro-batch's summed loss is divided by the labelled tokens
                # of the whole step, so every token weighs the same however the batches are split.
                n_tokens = max(1, sum(int((mb["labels"] != IGNORE).sum()) for mb in micro))
                step_loss = torch.zeros((), device=device)
                for mb in micro:
                    input_ids, attention_mask, labels = (mb[k].to(device, non_blocking=True)
                                                         for k in ("input_ids", "attention_mask", "labels"))
                    with autocast(device, precision):
                        loss_sum = module(input_ids, attention_mask, labels)
                    scaled = loss_sum / n_tokens
                    (scaler.scale(scaled) if scaler else scaled).backward()
                    step_loss += loss_sum.detach()
                step_loss = step_loss.item()
                if not math.isfinite(step_loss):
                    last = checkpoint.latest(out)
                    raise UsageError(f"the training loss became {step_loss} at step {step + 1}; "
                                     + (f"the last good checkpoint is {last}; " if last else "")
                                     + "try a lower --lr or --precision fp32")
                if scaler:
                    scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
                lr = scheduler.get_last_lr()[0]
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                inputs = sum(int(mb["attention_mask"].sum()) for mb in micro)
                seconds = time.perf_counter() - started
                progress.update(step=step, batches_done=progress["batches_done"] + len(micro),
                                train_tokens=progress["train_tokens"] + inputs,
                                train_seconds=progress["train_seconds"] + seconds)
                window.update(loss_sum=window["loss_sum"] + step_loss, tokens=window["tokens"] + n_tokens,
                              inputs=window["inputs"] + inputs, seconds=window["seconds"] + seconds)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss / n_tokens:.4f}", lr=f"{lr:.2e}")

                if step % cfg.log_every == 0 or step == total_steps:
                    mean = window["loss_sum"] / window["tokens"]
                    writer.add_scalar("train/loss", mean, step)
                    writer.add_scalar("train/perplexity", perplexity(mean), step)
                    writer.add_scalar("train/lr", lr, step)
                    writer.add_scalar("train/grad_norm", float(grad_norm), step)
                    writer.add_scalar("train/tokens_per_sec", window["inputs"] / window["seconds"], step)
                    window.update(loss_sum=0.0, tokens=0, inputs=0, seconds=0.0)
                if cfg.eval_every and step % cfg.eval_every == 0:
                    eval_loss, last_eval = run_evaluation(step), step
                if cfg.save_every and step % cfg.save_every == 0:
                    save_checkpoint()
                if stop.signum is not None:
                    break
            if stop.signum is not None:
                break
            if progress["batches_done"] >= batches_per_epoch:  # the epoch ran out, not the step budget
                if last_eval != step:
                    eval_loss, last_eval = run_evaluation(step), step
                progress.update(epoch=progress["epoch"] + 1, batches_done=0)
                if cfg.save_every:
                    save_checkpoint()
        bar.close()
        if stop.signum is not None:
            path = save_checkpoint()
            writer.close()
            resume_cmd = " ".join([os.path.basename(sys.argv[0]) or "train.py", *sys.argv[1:]])
            if "--resume-from" not in resume_cmd:
                resume_cmd += f" --resume-from {path}"
            print(f"stopped by signal {stop.signum} at step {step}; checkpoint {path}\n"
                  f"resume with: python {resume_cmd}", file=sys.stderr)
            raise SystemExit(128 + stop.signum)

    if last_eval != step:
        eval_loss = run_evaluation(step)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    metrics = {
        "eval_loss": eval_loss, "perplexity": perplexity(eval_loss),
        "perplexity_before": progress["perplexity_before"], "train_steps": step,
        "train_tokens": progress["train_tokens"], "train_seconds": progress["train_seconds"],
        "tokens_per_second": progress["train_tokens"] / max(progress["train_seconds"], 1e-9),
        "precision": precision, "model": model_name, "block_size": block_size,
    }
    write_json(out / "metrics.json", metrics)
    writer.close()
    print(f"perplexity: {metrics['perplexity_before']:.3f} -> {metrics['perplexity']:.3f}")
    return metrics


@torch.no_grad()
def evaluate(module, loader, device, precision: str) -> float:
    """Mean loss per labelled token over the whole loader (token-weighted, not a mean of batch means)."""
    was_training = module.training
    module.eval()
    loss_sum, tokens = 0.0, 0
    for batch in tqdm(loader, desc="evaluating", unit="batch", leave=False, dynamic_ncols=True):
        labels = batch["labels"].to(device)
        with autocast(device, precision):
            loss_sum += module(batch["input_ids"].to(device), batch["attention_mask"].to(device), labels).item()
        tokens += int((labels != IGNORE).sum())
    module.train(was_training)
    return loss_sum / max(tokens, 1)


def perplexity(loss: float) -> float:
    """exp(loss), saturating at inf instead of raising on overflow."""
    return math.exp(loss) if loss < 700 else float("inf")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_output_dir(out: Path, cfg: Config, resume: Path | None) -> None:
    """Refuse to mix runs: another run's checkpoints stay untouched unless the user says otherwise."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file")
    if resume is None and checkpoint.all_checkpoints(out) and not cfg.overwrite_output_dir:
        raise UsageError(f"--output-dir {out} holds another run's checkpoints: continue it with --resume-from "
                         "latest, replace it with --overwrite-output-dir, or choose another --output-dir")
    parent = next(p for p in [out, *out.parents] if p.exists())
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--output-dir {out}: {parent} is not writable")


def restore(path: Path, cfg: Config, model_name, model, optimizer, scheduler, scaler) -> dict:
    """Load a checkpoint into the run's objects; return its progress. Refuse another task's or model's."""
    state = checkpoint.read_state(path)
    saved = {**state["config"], "model": state["model"]}
    ours = {**cfg.to_dict(), "model": model_name}
    differ = [k for k in RESUME_FIXED if saved.get(k) != ours.get(k)]
    if differ:
        what = ", ".join(f"{k}={saved.get(k)!r} (now {ours.get(k)!r})" for k in differ)
        raise UsageError(f"--resume-from {path}: the checkpoint is of a different run: {what}")
    model.load_state_dict(checkpoint.load_tensors(path, "model.pt"))
    optimizer.load_state_dict(checkpoint.load_tensors(path, "optimizer.pt"))
    scheduler.load_state_dict(checkpoint.load_tensors(path, "scheduler.pt"))
    if scaler is not None and (Path(path) / "scaler.pt").exists():
        scaler.load_state_dict(checkpoint.load_tensors(path, "scaler.pt"))
    checkpoint.set_rng_state(checkpoint.load_tensors(path, "rng.pt"))
    print(f"resuming from {path} at step {state['step']}")
    return {k: state[k] for k in ("step", "epoch", "batches_done", "perplexity_before", "window",
                                  "train_tokens", "train_seconds")}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class StopOnSignal:
    """SIGINT/SIGTERM ask the loop to stop after the current optimizer step; a second one quits at once."""

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        print(f"\nsignal {signum}: finishing this step and writing a checkpoint (again to quit at once)",
              file=sys.stderr, flush=True)
