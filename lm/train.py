"""The training loop, top to bottom: settings, data, model, optimizer, then the steps."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import shutil
import signal
import sys
import time
from datetime import datetime
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lm import checkpoint, distributed
from lm.config import Config
from lm.data import EpochSampler
from lm.embedded import cache_root
from lm.errors import UsageError
from lm.hardware import (autocast, check_compile, choose_precision, configure, flops_per_token, native_bf16,
                         peak_flops, resolve_device)
from lm.masking import IGNORE
from lm.modeling import load_config, load_model, load_tokenizer, max_positions, resolve_block_size, resolve_model
from lm.objectives import TokenLoss, make_collator
from lm.optim import build_optimizer, build_scheduler, parameter_groups
from lm.output import check_output_dir, summary_writer, write_json
from lm.token_cache import load_examples, load_sources

def train(cfg: Config, *, model=None, tokenizer=None, loss=TokenLoss) -> dict:
    """Fine-tune as `cfg` says and return the metrics also written to OUTPUT_DIR/metrics.json.

    `model` and `tokenizer` replace what `cfg.model` names. `loss` wraps the model into a module
    whose forward(input_ids, attention_mask, labels) returns the summed loss over labelled tokens.
    Under torchrun every process calls this; rank 0 alone writes and prints.
    """
    cfg = cfg.validated()
    seed_everything(cfg.seed)

    # -- everything that needs no model is checked first, so mistakes cost seconds
    device = resolve_device(cfg.device)
    precision, precision_why = choose_precision(cfg.precision, device.type, native_bf16(device))
    check_compile(cfg.compile, device)
    world, device = distributed.init(device)
    if cfg.fsdp and not world.distributed:
        raise UsageError("--fsdp shards the model over processes: launch with torchrun --nproc_per_node N (N >= 2)")
    configure(device)
    say = print if world.main else (lambda *a, **k: None)
    out = Path(cfg.output_dir or f"runs/{cfg.task}-{datetime.now():%Y%m%d-%H%M%S}")
    resume = checkpoint.resolve(cfg.resume_from, out) if cfg.resume_from else None
    check_output_dir(out, cfg, resume)
    if tokenizer is None:
        path, extra = resolve_model(cfg.model, cfg.task, cfg.cache_dir)
    model_name = cfg.model or ("custom" if model is not None else path)
    if resume is not None:
        checkpoint.check_resumable(resume, cfg, model_name)
    sources = load_sources(cfg)

    # -- tokenizer and blocks, prepared once: rank 0 tokenizes, the other ranks read its result
    if tokenizer is None:
        tokenizer = load_tokenizer(path, extra, cfg.task)
        model_config = model.config if model is not None else load_config(path, extra)
    else:
        model_config = model.config
    block_size, note = resolve_block_size(cfg.block_size, max_positions(model_config, tokenizer))
    if note and world.main:
        print(f"warning: {note}", file=sys.stderr)
    def examples():
        return load_examples(cfg, sources, tokenizer, block_size, cache_root(cfg.cache_dir))

    if cfg.line_by_line:  # lists in memory: rank 0 tokenizes and sends them
        train_set, eval_set = distributed.broadcast_from_main(world, examples() if world.main else None)
    else:  # rank 0 fills the token cache first; the others then memory-map the same files, quietly
        if world.main:
            train_set, eval_set = examples()
        distributed.barrier(world)
        if not world.main:
            with contextlib.redirect_stdout(io.StringIO()):
                train_set, eval_set = examples()
    if cfg.prepare_only:
        return {"train_blocks": len(train_set), "validation_blocks": len(eval_set)}

    # -- model, loss, optimizer, schedule
    fresh = frozenset()
    if model is None:
        model, fresh = load_model(path, extra, cfg.task)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    module = loss(model).to(device)
    if cfg.compile:
        module.compile()  # in place: the saved state dict keeps its plain names
    if cfg.fsdp:
        trained = distributed.shard(module, model)
    elif world.distributed:
        trained = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        trained = module
    groups = parameter_groups(model, cfg.lr, cfg.weight_decay, fresh, cfg.head_lr)
    optimizer = build_optimizer(groups, cfg, device, fused=not cfg.fsdp)
    sampler = EpochSampler(len(train_set), cfg.seed, rank=world.rank, world=world.size)
    batches_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum_steps)
    total_steps = cfg.max_train_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = build_scheduler(optimizer, total_steps, warmup, cfg.lr_scheduler)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    if world.distributed:  # same weights everywhere (DDP broadcast them); dropout differs per rank
        torch.manual_seed(cfg.seed + world.rank)

    collate = make_collator(cfg.task, tokenizer, cfg.mlm_prob, cfg.seed)
    # Private generators: a DataLoader otherwise draws its base seed from the global RNG at every
    # iter(), which would shift dropout after a resume mid-epoch.
    train_loader = DataLoader(train_set, cfg.batch_size, sampler=sampler, collate_fn=collate,
                              generator=torch.Generator())
    # Evaluation is sharded too, except under FSDP, whose forwards are collectives that every rank
    # must run equally often: there each rank evaluates the whole split.
    eval_world = distributed.World() if cfg.fsdp else world
    eval_loader = DataLoader(eval_set, cfg.eval_batch_size or cfg.batch_size,
                             sampler=EpochSampler(len(eval_set), cfg.seed, shuffle=False, rank=eval_world.rank,
                                                  world=eval_world.size, drop_remainder=False),
                             collate_fn=make_collator(cfg.task, tokenizer, cfg.mlm_prob, cfg.seed, evaluation=True),
                             generator=torch.Generator())

    # -- where the run stands: fresh, or exactly where a checkpoint left it
    progress = {"step": 0, "epoch": 0, "batches_done": 0, "perplexity_before": None,
                "window": {"loss_sum": 0.0, "tokens": 0, "inputs": 0, "seconds": 0.0},
                "train_tokens": 0, "train_seconds": 0.0}
    if resume is not None:
        progress = checkpoint.restore(resume, model, optimizer, scheduler, scaler, world, sharded=cfg.fsdp)
        say(f"resuming from {resume} at step {progress['step']}")
    elif cfg.overwrite_output_dir and world.main:
        for old in checkpoint.all_checkpoints(out):
            shutil.rmtree(old)

    n_params = sum(p.numel() for p in model.parameters())
    token_flops = flops_per_token(n_params, model_config.num_hidden_layers, model_config.hidden_size, block_size)
    peak = peak_flops(device, precision, cfg.peak_flops)  # None: MFU unknown (a CPU without --peak-flops)
    say(f"model {model_name}: {n_params / 1e6:.1f}M parameters"
        + (f", {len(fresh)} freshly initialised tensors (lr {cfg.head_lr or cfg.lr:g})" if fresh else ""))
    say(f"device {device}" + (f" x {world.size} processes" if world.distributed else "")
        + f", precision {precision} ({precision_why})" + (", compiled" if cfg.compile else ""))
    say(f"data: {len(train_set)} train / {len(eval_set)} validation examples of <= {block_size} tokens; "
        f"{cfg.batch_size * cfg.grad_accum_steps * world.size} examples per step, {total_steps} steps, output {out}")

    if world.main:
        out.mkdir(parents=True, exist_ok=True)
    writer = summary_writer(out / "logs", world, purge_step=progress["step"] + 1 if resume else None)
    if resume is None:
        writer.add_text("config", "```\n" + json.dumps({**cfg.to_dict(), "precision": precision}, indent=2) + "\n```")

    def run_evaluation(step: int) -> float:
        loss_value = evaluate(module, eval_loader, device, precision, eval_world)
        writer.add_scalar("eval/loss", loss_value, step)
        writer.add_scalar("eval/perplexity", perplexity(loss_value), step)
        return loss_value

    if cfg.eval_only:
        eval_loss = run_evaluation(0)
        metrics = {"eval_loss": eval_loss, "perplexity": perplexity(eval_loss), "eval_tokens": eval_set.num_tokens,
                   "precision": precision, "model": model_name}
        if world.main:
            write_json(out / "metrics.json", metrics)
        say(f"perplexity: {perplexity(eval_loss):.4f}")
        writer.close()
        return metrics

    if progress["perplexity_before"] is None:
        progress["perplexity_before"] = perplexity(run_evaluation(0))
        say(f"perplexity before training: {progress['perplexity_before']:.3f}")

    def save_checkpoint() -> Path:
        # collectives first, on every rank: the RNG states of all ranks, and under FSDP the whole weights
        rng = distributed.gather_to_main(world, checkpoint.rng_state())
        model_state, optim_state = distributed.full_state(model, optimizer, sharded=cfg.fsdp)
        if not world.main:
            return None
        state = {**progress, "task": cfg.task, "model": model_name, "config": cfg.to_dict(),
                 "world_size": world.size}
        tensors = {"model.pt": model_state, "optimizer.pt": optim_state, "scheduler.pt": scheduler.state_dict(),
                   "rng.pt": rng, **({"scaler.pt": scaler.state_dict()} if scaler else {})}
        return checkpoint.save(out, state, tensors, cfg.save_total_limit)

    # -- the loop
    step, window = progress["step"], progress["window"]
    last_eval = eval_loss = None
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", dynamic_ncols=True,
               disable=not world.main)
    trained.train()
    stopping = False
    with checkpoint.StopOnSignal() as stop:
        while step < total_steps:
            sampler.set_epoch(progress["epoch"], start=progress["batches_done"] * cfg.batch_size * world.size)
            collate.epoch = progress["epoch"]
            batches = iter(train_loader)
            while step < total_steps:
                started = time.perf_counter()
                micro = list(islice(batches, cfg.grad_accum_steps))
                if not micro:
                    break
                # One optimizer step. Each micro-batch's summed loss is divided by the labelled tokens
                # of the whole step on all ranks, so every token weighs the same however the step is
                # split into micro-batches and processes (DDP averages gradients: hence * world.size).
                n_tokens, = distributed.all_sum(world, sum(int((mb["labels"] != IGNORE).sum()) for mb in micro),
                                                device=device)
                scale = world.size / max(n_tokens, 1)
                step_loss = torch.zeros((), device=device)
                for i, mb in enumerate(micro):
                    input_ids, attention_mask, labels = (mb[k].to(device, non_blocking=True)
                                                         for k in ("input_ids", "attention_mask", "labels"))
                    sync = i == len(micro) - 1  # reduce gradients across ranks once per step
                    with no_sync(trained, world, cfg.fsdp, sync), autocast(device, precision):
                        loss_sum = trained(input_ids, attention_mask, labels)
                    (scaler.scale(loss_sum * scale) if scaler else loss_sum * scale).backward()
                    step_loss += loss_sum.detach()
                step_loss, = distributed.all_sum(world, step_loss.item(), device=device)
                if not math.isfinite(step_loss):
                    last = checkpoint.latest(out)
                    raise UsageError(f"the training loss became {step_loss} at step {step + 1}; "
                                     + (f"the last good checkpoint is {last}; " if last else "")
                                     + "try a lower --lr or --precision fp32")
                if scaler:
                    scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP
                lr = scheduler.get_last_lr()[0]
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                inputs = sum(int(mb["attention_mask"].sum()) for mb in micro) * world.size
                seconds = time.perf_counter() - started
                progress.update(step=step, batches_done=progress["batches_done"] + len(micro),
                                train_tokens=progress["train_tokens"] + inputs,
                                train_seconds=progress["train_seconds"] + seconds)
                window.update(loss_sum=window["loss_sum"] + step_loss, tokens=window["tokens"] + n_tokens,
                              inputs=window["inputs"] + inputs, seconds=window["seconds"] + seconds)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss / max(n_tokens, 1):.4f}", lr=f"{lr:.2e}")

                if step % cfg.log_every == 0 or step == total_steps:
                    mean = window["loss_sum"] / max(window["tokens"], 1)
                    tokens_per_sec = window["inputs"] / window["seconds"]
                    writer.add_scalar("train/loss", mean, step)
                    writer.add_scalar("train/perplexity", perplexity(mean), step)
                    writer.add_scalar("train/lr", lr, step)
                    writer.add_scalar("train/grad_norm", float(grad_norm), step)
                    writer.add_scalar("train/tokens_per_sec", tokens_per_sec, step)
                    if peak:
                        writer.add_scalar("train/mfu", token_flops * tokens_per_sec / peak / world.size, step)
                    window.update(loss_sum=0.0, tokens=0, inputs=0, seconds=0.0)
                if cfg.eval_every and step % cfg.eval_every == 0:
                    eval_loss, last_eval = run_evaluation(step), step
                if cfg.save_every and step % cfg.save_every == 0:
                    save_checkpoint()
                stopping = distributed.all_sum(world, stop.signum is not None, device=device)[0] > 0
                if stopping:
                    break
            if stopping:
                break
            if progress["batches_done"] >= batches_per_epoch:  # the epoch ran out, not the step budget
                if last_eval != step:
                    eval_loss, last_eval = run_evaluation(step), step
                progress.update(epoch=progress["epoch"] + 1, batches_done=0)
                if cfg.save_every:
                    save_checkpoint()
        bar.close()
        if stopping:
            path = save_checkpoint()
            writer.close()
            signum = stop.signum or signal.SIGTERM
            if world.main:
                print(f"stopped by signal {signum} at step {step}; checkpoint {path}\n"
                      f"resume with: {checkpoint.resume_command(sys.argv, path)}", file=sys.stderr)
            raise SystemExit(128 + signum)

    if last_eval != step:
        eval_loss = run_evaluation(step)
    seconds = max(progress["train_seconds"], 1e-9)
    metrics = {
        "eval_loss": eval_loss, "perplexity": perplexity(eval_loss),
        "perplexity_before": progress["perplexity_before"], "train_steps": step,
        "train_tokens": progress["train_tokens"], "train_seconds": progress["train_seconds"],
        "tokens_per_second": progress["train_tokens"] / seconds,
        "mfu": token_flops * progress["train_tokens"] / seconds / peak / world.size if peak else None,
        "precision": precision, "model": model_name, "block_size": block_size, "world_size": world.size,
    }
    model_state, _ = distributed.full_state(model, sharded=cfg.fsdp)  # a collective under FSDP
    if world.main:
        model.save_pretrained(out, state_dict=model_state)
        tokenizer.save_pretrained(out)
        write_json(out / "metrics.json", metrics)
    writer.close()
    distributed.barrier(world)  # nobody leaves before the model is saved
    say(f"perplexity: {metrics['perplexity_before']:.3f} -> {metrics['perplexity']:.3f}"
        + (f" (MFU {metrics['mfu']:.1%})" if peak else ""))
    return metrics


@torch.no_grad()
def evaluate(module, loader, device, precision: str, world=distributed.World()) -> float:
    """Mean loss per labelled token over the whole split, on all ranks (token-weighted, not a mean of means)."""
    was_training = module.training
    module.eval()
    loss_sum, tokens = 0.0, 0
    for batch in tqdm(loader, desc="evaluating", unit="batch", leave=False, dynamic_ncols=True, disable=not world.main):
        labels = batch["labels"].to(device)
        with autocast(device, precision):
            loss_sum += module(batch["input_ids"].to(device), batch["attention_mask"].to(device), labels).item()
        tokens += int((labels != IGNORE).sum())
    module.train(was_training)
    loss_sum, tokens = distributed.all_sum(world, loss_sum, tokens, device=device)
    return loss_sum / tokens if tokens else float("nan")  # nothing to predict: no perplexity, not 1.0


def no_sync(trained, world, fsdp: bool, sync: bool):
    """Skip the gradient reduction of an accumulation micro-step (DDP's no_sync, FSDP2's flag)."""
    if fsdp:
        trained.set_requires_gradient_sync(sync)
    elif world.distributed and not sync:
        return trained.no_sync()
    return contextlib.nullcontext()


def perplexity(loss: float) -> float:
    """exp(loss), saturating at inf instead of raising on overflow."""
    return math.exp(loss) if not loss >= 700 else float("inf")  # nan stays nan


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
