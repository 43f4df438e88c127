"""The training loop, top to bottom: setup, data, model, then fit() runs the steps and finish() saves.

train() calls the stages in reading order. `Run` holds what setup builds once; `Progress`
(lm.checkpoint) is where the run stands, the one thing a checkpoint adds to the tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lm import (adapters, checkpoint, data, distributed, documents, gguf, gguf_vocab, layer_stats, memory, samples,
                spikes)
from lm.checkpoint import Progress, Window
from lm.config import LORA_LR_FACTOR, Config, find_objective, is_adapter_dir, split_overrides
from lm.embedded import cache_root
from lm.data import IGNORE, StepSampler
from lm.errors import UsageError
from lm.compiling import COMPILE_AFTER, COMPILE_ERRORS, Compiling, check_compile, compile_key, inductor_cache
from lm.hardware import (FlopCounts, Peak, autocast, choose_attention, choose_precision, configure, flop_counts,
                         native_bf16, probe_shapes, resolve_device, resolve_peak, step_flops)
from lm.modeling import (check_model_class, check_vocabulary, fit_to_tokenizer, holds_tokenizer, load_config,
                         load_model, load_tokenizer, max_positions, new_model, resolve_block_size, resolve_model,
                         resolve_tokenizer, scratch_config)
from lm.losses import loss_and_logs
from lm.objectives import Objective
from lm.evaluation import evaluate, perplexity
from lm.optim import (build_optimizer, describe, lr_factor, parameter_groups, saved_groups, schedule, schedule_change,
                      set_lr)
from lm.output import check_output_dir, clear_run, earlier_run, summary_writer, write_json, write_trainer_results
from lm.texts import first_texts, load_sources, read_texts


@dataclass
class Run:
    """What a run sets up once, filled in stage by stage; the loop reads it."""

    cfg: Config
    objective: Objective
    world: distributed.World
    device: torch.device
    precision: str
    out: Path
    model_name: str
    resume: Path | None = None
    sources: tuple = ()  # (train, validation) texts, checked
    texts_apart: bool = False  # whether a row may hold several texts, each attending to itself (lm.documents)
    model_path: tuple | None = None  # (path or Hub name, from_pretrained kwargs) of the model loaded, if one is
    adapter_dir: str | None = None  # --model names a LoRA adapter: its directory (model_path is its base)
    tokenizer_path: tuple | None = None  # the same for the tokenizer: --tokenizer, else the model's own
    loss: object = None  # (model) -> loss module: the objective's, or train()'s `loss` argument
    make_optimizer: object = None  # (param_groups, cfg) -> optimizer: build_optimizer, or train()'s `optimizer`
    tokenizer: object = None
    model_config: object = None  # checked against the task, read for the longest block the model takes
    block_size: int = 0
    model: torch.nn.Module = None  # the plain model (with LoRA layers inside, if any): what is saved without LoRA
    adapted: object = None  # under LoRA, peft's PeftModel around `model`: what saves the adapter
    lowered: bool = False  # under LoRA in bf16, the frozen base was loaded in bf16: --merge-lora reads it again in fp32
    module: torch.nn.Module = None  # the loss module wrapping it: what evaluates
    trained: torch.nn.Module = None  # the module under DDP or FSDP: what trains
    optimizer: torch.optim.Optimizer = None
    scaler: torch.amp.GradScaler | None = None
    parameters: tuple[int, int] = (0, 0)  # the model's, and of those the ones that train
    parts: layer_stats.Parts | None = None  # --log-layers: the parts of the model whose statistics are logged
    prompts: list = field(default_factory=list)  # --sample-every: the texts decoded from
    flop_counts: FlopCounts | None = None  # what a step's FLOPs depend on, for MFU
    peak: Peak | None = None  # FLOP/s of one device at this precision: the GPU table, measured, or --peak-flops
    eval_world: distributed.World = distributed.World()  # who shares the evaluation
    train_data: dict = field(default_factory=dict)  # how many training examples, and a digest of their tokens
    total_steps: int = 0
    warmup_steps: int = 0
    writer: object = None
    evaluated: dict = field(default_factory=dict)  # step -> eval loss
    eval_seconds: dict = field(default_factory=dict)  # step -> how long that evaluation took
    cannot_compile: str | None = None  # why torch.compile can't run here, if it can't
    compiling: Compiling | None = None  # whether and since when training steps run compiled
    plan: memory.Plan | None = None  # the peak memory planned per process (None: a model given as an object)

    def say(self, *args, **kwargs) -> None:
        """print on rank 0 only."""
        if self.world.main:
            print(*args, **kwargs)


def train(cfg: Config, *, objective: Objective | None = None, model=None, tokenizer=None, loss=None,
          optimizer=None) -> dict:
    """Fine-tune as `cfg` says and return the metrics also written to OUTPUT_DIR/metrics.json.

    `objective` defaults to the one cfg.task names. `model` and `tokenizer` replace what `cfg.model`
    names (either alone: the other comes from cfg.model). `loss` replaces the objective's loss module:
    (model) -> module whose forward(input_ids, attention_mask, labels) returns the summed loss over
    labelled tokens. `optimizer` replaces the one --optimizer names: (param_groups, cfg) -> optimizer, given the
    groups of lm.optim.parameter_groups. Under torchrun every process calls this; rank 0 alone writes and prints.
    """
    cfg = cfg.validated()
    objective = objective or find_objective(cfg.task)
    if objective.name != cfg.task:
        raise UsageError(f"the config is for task {cfg.task!r}, the objective is {objective.name!r}")
    if optimizer is not None and cfg.optimizer != Config.optimizer:
        raise UsageError(f"train(optimizer=...) builds the optimizer: drop --optimizer {cfg.optimizer}")
    run, changes = setup(cfg, objective, model, tokenizer, optimizer or build_optimizer)
    run.loss = loss or objective.loss
    train_set, eval_set = prepare_data(run, tokenizer)
    if cfg.prepare_only:
        return {"train_blocks": len(train_set), "validation_blocks": len(eval_set)}
    with inductor_cache(cache_root(cfg.cache_dir)):  # compiled code's files go there, for this run alone
        build_model(run, model)
        eval_loader = evaluation_batches(run, eval_set)
        progress = start(run, changes, train_set, eval_loader)
        if cfg.eval_only:
            return finish(run, None, eval_loader, len(train_set))
        fit(run, progress, train_set, eval_loader)
        return finish(run, progress, eval_loader, len(train_set))


def setup(cfg: Config, objective: Objective, model, tokenizer, make_optimizer) -> tuple[Run, list[str]]:
    """Everything that needs no model: device, processes, output dir, the checkpoint to resume, the data files.

    Mistakes found here cost seconds. Returns the run and the options a resumed run changes.
    """
    if model is not None and tokenizer is None and cfg.model is None:
        raise UsageError("train(model=...) needs tokenizer=... as well, or cfg.model naming the directory "
                         "that holds the model's tokenizer")
    if model is not None and cfg.from_scratch:
        raise UsageError("train(model=...) trains the model given: drop --model-type and --config-name")
    device = resolve_device(cfg.device)
    precision, precision_why = choose_precision(cfg.precision, device.type, native_bf16(device))
    # --eval-only evaluates eagerly (Run.stance): nothing would be compiled
    cannot_compile = check_compile("off" if cfg.eval_only else cfg.compile, device, cache_root(cfg.cache_dir))
    world, device = distributed.init(device, cfg.ddp_timeout)
    if cfg.fsdp and not world.distributed:
        raise UsageError("--fsdp shards the model over processes: launch with torchrun --nproc_per_node N (N >= 2)")
    configure(device)
    # Resuming goes on in the checkpoint's run directory; a new run gets a new one, one name for all
    # ranks (their clocks may tick over a second apart)
    default_out = checkpoint.run_dir(cfg.resume_from) or f"runs/{objective.name}-{datetime.now():%Y%m%d-%H%M%S}"
    out = Path(distributed.broadcast_from_main(world, cfg.output_dir or default_out))
    model_name = cfg.model or ("custom" if model is not None else scratch_name(cfg) if cfg.from_scratch
                               else objective.embedded_model)
    run = Run(cfg, objective, world, device, precision, out, model_name, cannot_compile=cannot_compile,
              make_optimizer=make_optimizer)
    if cfg.lr_scheduler == "constant" and (cfg.warmup_steps or cfg.warmup_ratio):
        run.say("warning: --lr-scheduler constant has no warmup, as in transformers; "
                "constant_with_warmup warms up", file=sys.stderr)
    if adapted(cfg) and cfg.lr == LORA_LR_FACTOR * objective.defaults.get("lr", Config.lr):
        run.say(f"lr {cfg.lr:g}: LoRA's default, {LORA_LR_FACTOR}x full fine-tuning's (adapters learn their update "
                "from zero; --lr to choose)")
    run.resume = checkpoint.resolve(cfg.resume_from, out) if cfg.resume_from else None
    check_output_dir(out, cfg, run.resume)
    if cfg.resume_from == "auto":  # which way the one command for every restart goes this time
        left = earlier_run(out)
        run.say(f"--resume-from auto: resuming from {run.resume}" if run.resume else
                f"--resume-from auto: no checkpoint in {out / checkpoint.DIRNAME}: starting afresh"
                + (f", replacing what a run without one left ({', '.join(left)})" if left else ""))
    changes = checkpoint.check_resumable(run.resume, cfg, model_name, world.size) if run.resume else []
    run.sources = load_sources(cfg)  # checks the files before anything slow (e.g. converting the default model)
    if cfg.sample_every:
        run.prompts = ([t.rstrip("\n") for t in read_texts(cfg.sample_prompts, cfg.text_column) if t.strip()]
                       if cfg.sample_prompts else first_texts(run.sources[1], samples.PROMPTS))
    locate_model(run, model, tokenizer)
    run.texts_apart = data.texts_apart(cfg, run.sources, run.model_config, run.say)
    if cfg.save_gguf:
        gguf.check_architecture(run.model_config, f"--model {run.model_name}")
    if run.adapter_dir:
        adapters.check_kept_settings(run.adapter_dir, cfg)
    elif cfg.lora_targets:
        adapters.check_targets(run.model_config, objective.model_class, cfg)
    if model is None:  # (a model given as an object is in memory already)
        run.plan = distributed.run_on_main(world, lambda: plan_memory(run))
    run.say(f"device {device}" + (f" x {world.size} processes" if world.distributed else "")
            + f", precision {precision} ({precision_why}), compile {'off' if cfg.eval_only else cfg.compile}"
            + (f" (decided after {COMPILE_AFTER} steps)" if cfg.compile == "auto" and not cfg.eval_only else ""))
    if run.plan is not None:
        run.say(run.plan.line() + ("" if run.plan.fits else
                                   ": it would not fit; started anyway (--ignore-memory-plan)"))
    return run, changes


def locate_model(run: Run, model, tokenizer) -> None:
    """Where the model and the tokenizer come from (a model directory, an adapter's, a configuration from scratch),
    and the model's configuration, checked against the task; from scratch, fitted to the tokenizer, loaded here."""
    cfg, objective = run.cfg, run.objective
    run.adapter_dir = cfg.model if is_adapter_dir(cfg.model) else None
    owner = f"--model {run.model_name}"  # the option that names the model (and its tokenizer), for messages
    if cfg.from_scratch:  # a configuration, and the tokenizer saved beside it if there is one
        owner = f"--model-type {cfg.model_type}" if cfg.model_type else f"--config-name {cfg.config_name}"
        own = resolve_model(cfg.config_name, None, cfg.cache_dir, run.say, "--config-name") if cfg.config_name else None
        run.model_config = scratch_config(cfg.model_type, own, split_overrides(cfg.config_overrides))
    elif model is None or tokenizer is None:
        base = adapters.adapter_base(run.adapter_dir) if run.adapter_dir else cfg.model
        run.model_path = own = resolve_model(base, objective.embedded_model, cfg.cache_dir, run.say)
        if run.adapter_dir and holds_tokenizer(run.adapter_dir):
            own = (run.adapter_dir, {})
    if tokenizer is None:
        run.tokenizer_path = resolve_tokenizer(cfg.tokenizer, own, owner, cfg.cache_dir, run.say)
    if model is not None:
        run.model_config = model.config
    else:
        if not cfg.from_scratch:
            run.model_config = load_config(*run.model_path)
        check_model_class(run.model_config, objective.model_class, owner, objective.embedded_model)
    if cfg.from_scratch:  # the model takes the tokenizer's vocabulary: known before the memory plan sizes it
        run.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(*run.tokenizer_path)
        fit_to_tokenizer(run.model_config, run.tokenizer, split_overrides(cfg.config_overrides))


def plan_memory(run: Run) -> memory.Plan | None:
    """The run's memory plan from the model's config alone (lm.memory); a UsageError where it won't fit."""
    cfg = run.cfg
    if run.adapter_dir:  # plan as LoRA (the adapter's own layers: memory.planned_model)
        cfg = dataclasses.replace(cfg, lora_rank=adapters.adapter_config(run.adapter_dir).get("r", 8))
    path = run.model_path[0] if run.model_path else None  # (None: a model from scratch)
    return memory.plan_run(cfg, run.model_config, run.objective.model_class, path, run.precision, run.device,
                           run.world.size, cache_root(cfg.cache_dir), run.make_optimizer, run.adapter_dir)


def prepare_data(run: Run, tokenizer) -> tuple:
    """The tokenizer and the (train, validation) examples: rank 0 tokenizes, the other ranks read its result."""
    cfg, world = run.cfg, run.world
    if run.tokenizer is None:  # (a model from scratch has it already)
        run.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(*run.tokenizer_path)
    if run.objective.check_tokenizer:
        run.objective.check_tokenizer(run.tokenizer)
    if cfg.save_gguf:  # llama.cpp must tokenize as it does, known before training
        gguf_vocab.pre_tokenizer_name(run.tokenizer)
    if cfg.from_scratch:  # fitted to the tokenizer's vocabulary in locate_model
        run.say(f"model configuration: {run.model_config}")  # as run_clm.py logs it ("New config: ...")
    check_vocabulary(run.tokenizer, run.model_config, run.tokenizer_path[0] if run.tokenizer_path else "given",
                     run.model_name)
    run.block_size, note = resolve_block_size(cfg.block_size, max_positions(run.model_config, run.tokenizer))
    if note:
        run.say(f"warning: {note}", file=sys.stderr)
    return data.prepare_data(cfg, run.tokenizer, run.block_size, world, run.say, sources=run.sources,
                             packed=run.texts_apart)


def build_model(run: Run, model) -> None:
    """The model on its device, the loss module around it, its DDP/FSDP wrapper and the optimizer."""
    cfg, device, world = run.cfg, run.device, run.world
    fresh = frozenset()
    if model is None:
        attention, why = distributed.run_on_main(world, lambda: choose_attention(
            device, run.precision, run.model_config, cfg.batch_size, run.block_size, cache_root(cfg.cache_dir)))
        run.say(f"attention: {why}")
        seed_everything(cfg.seed)  # fresh parameters (e.g. a new head) from the seed, whatever ran before
        # under LoRA the base is frozen: in bf16 it needs no fp32 copy
        dtype = torch.bfloat16 if adapted(cfg) and run.precision == "bf16" else torch.float32
        if cfg.from_scratch:
            model = new_model(run.model_config, run.objective.model_class, attention)
        else:
            model, fresh = load_model(*run.model_path, run.objective.model_class, attention, dtype)
            run.lowered = dtype != torch.float32
    if run.objective.adapt:
        run.objective.adapt(model, run.tokenizer)
    if run.texts_apart:
        documents.prepare_model(model, device, run.precision)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapted(cfg):
        run.adapted, fresh = (adapters.load_adapters(model, run.adapter_dir, fresh) if run.adapter_dir
                              else adapters.add_adapters(model, cfg, fresh))
        model = run.adapted.get_base_model()  # the same model, LoRA layers inside: the loop needs nothing else
    run.model = model.to(device)
    run.module = run.loss(model).to(device)
    run.module.texts = run.texts_apart  # masks number texts only then (TokenLoss)
    if cfg.fsdp:
        run.trained = distributed.shard(run.module, model)
    elif world.distributed:
        run.trained = DistributedDataParallel(run.module, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        run.trained = run.module
    run.optimizer = run.make_optimizer(parameter_groups(model, cfg.lr, cfg.weight_decay, fresh, cfg.head_lr), cfg)
    run.scaler = torch.amp.GradScaler("cuda") if run.precision == "fp16" else None
    run.parts = layer_stats.model_parts(model) if cfg.log_layers else None
    run.parameters = n_params, n_trained = (sum(p.numel() for p in model.parameters()),
                                            sum(p.numel() for p in model.parameters() if p.requires_grad))
    run.flop_counts = flop_counts(model)
    run.compiling = Compiling("off" if cfg.eval_only else cfg.compile, device, run.precision,
                              compile_key(device, run.precision, model.config, cfg, run.block_size),
                              cache_root(cfg.cache_dir), run.cannot_compile)
    shapes = probe_shapes(model.config, cfg.batch_size * run.block_size)
    peak = distributed.run_on_main(world, lambda: resolve_peak(
        cfg.peak_flops, device, run.precision, shapes, cache_root(cfg.cache_dir)))
    run.peak = peak if world.main else Peak(peak.flops, peak.source)  # rank 0 alone measures, then and later
    run.say(f"MFU against a peak of {peak.flops / 1e9:,.1f} GFLOP/s per device ({peak.source})")
    run.say(f"model {run.model_name}: {n_params / 1e6:.1f}M parameters"
            + (f", {n_trained:,} of them trained ({n_trained / n_params:.2%}: LoRA adapters, lr {cfg.lr:g}"
               + (f"; in full, the fresh {', '.join(trained_copies(fresh))}" if fresh else "") + ")"
               if run.adapted else "")
            + (f", {len(fresh)} freshly initialised tensors (lr {cfg.head_lr or cfg.lr:g})" if fresh else ""))


def trained_copies(fresh: frozenset[str]) -> list[str]:
    """The modules whose trainable copies (peft's modules_to_save) hold the fresh parameters `fresh` names."""
    return sorted({name.split(".modules_to_save.")[0] for name in fresh})


def evaluation_batches(run: Run, eval_set) -> DataLoader:
    """Evaluation batches in file order, with the objective's fixed evaluation labels (e.g. masks), or the
    labels that come with --eval-stride's windows."""
    cfg = run.cfg
    # Sharded too, except under FSDP, whose forwards are collectives that every rank must run
    # equally often: there each rank evaluates the whole split.
    run.eval_world = distributed.World() if cfg.fsdp else run.world
    # Padded: a rank whose share ends a batch early gets None there (lm.evaluation skips it), so that
    # every rank asks the stop check, a collective, as often as the others.
    sampler = StepSampler(len(eval_set), cfg.seed, cfg.eval_batch_size or cfg.batch_size, run.eval_world.size,
                          run.eval_world.rank, shuffle=False, pad=True)
    if cfg.eval_stride:
        collate = data.WindowCollator(run.tokenizer)
    else:
        collate = run.objective.collator(run.tokenizer, cfg, True)
    return DataLoader(eval_set, batch_sampler=sampler, collate_fn=lambda items: collate(items) if items else None,
                      generator=torch.Generator())


def epoch_batches(run: Run, train_set, collate, sampler: StepSampler, epoch: int, start: int):
    """This rank's micro-batches of each optimizer step of `epoch`, from global example `start` on.

    In an epoch's short last step a rank may hold fewer micro-batches than rank 0. It runs `idle`
    ones instead, whose labels are all IGNORE: under DDP and FSDP every rank must run as many
    forwards and backwards, and these add nothing to the loss, the gradients or the counts.
    """
    sampler.set_epoch(epoch, start=start)
    # A private generator: a DataLoader otherwise draws its base seed from the global RNG at every
    # iter(), which would shift dropout after a resume mid-epoch.
    batches = iter(DataLoader(train_set, batch_sampler=sampler, collate_fn=functools.partial(collate, epoch=epoch),
                              generator=torch.Generator()))
    idle = None
    for micro, most in sampler.steps():
        if len(micro) < most and idle is None:  # as many rows as the others': compiled graphs keep their shapes
            idle = collate([train_set[i % len(train_set)] for i in range(sampler.batch_size)], epoch=epoch)
            idle.update(labels=torch.full_like(idle["labels"], IGNORE), idle=True)
        yield [next(batches) for _ in micro] + [idle] * (most - len(micro))


def start(run: Run, changes: list[str], train_set, eval_loader: DataLoader) -> Progress:
    """Where the run starts: afresh, or exactly where a checkpoint left it, with the changed options announced."""
    cfg, world = run.cfg, run.world
    n_train = len(train_set)
    run.total_steps, run.warmup_steps = schedule(cfg, n_train, world.size)
    run.train_data = {"examples": n_train, "digest": data.fingerprint(train_set.sequences)}
    # Dropout draws from the global generators, seeded here: after loading, converting, tokenizing and
    # measuring, so that nothing those did (or skipped, having it cached) moves what is trained. One
    # stream per rank; a resumed run then restores the checkpoint's.
    seed_everything(int(np.random.SeedSequence([cfg.seed, world.rank]).generate_state(1)[0]))
    progress = Progress()
    if run.resume is not None:
        state = checkpoint.read_state(run.resume)
        checkpoint.check_same_data(run.resume, state, run.train_data)
        # Another --max-eval-samples is another validation set, which the checkpoint's perplexity_before was not
        # measured on. The model is still as the run began (the checkpoint is not loaded yet): measure it here.
        before = None
        if state["config"].get("max_eval_samples") != cfg.max_eval_samples and state.get("perplexity_before"):
            before = perplexity(evaluate(run.module, eval_loader, run.device, run.precision, run.eval_world))
        snapshot = checkpoint.load(run.resume)
        last_group = (saved_groups(snapshot.optimizer) or [{}])[0]  # the learning rate of its last step
        progress = checkpoint.restore(snapshot, run.model, run.optimizer, run.scaler, world, cfg.fsdp, run.say,
                                      partial=run.adapted is not None)
        run.say(f"resuming from {run.resume} at step {progress.step}")
        remeasured = None
        if before is not None:
            remeasured = (f"resume: perplexity before training {progress.perplexity_before:.3f} -> {before:.3f}, "
                          "measured again on this run's validation set")
            progress.perplexity_before = before
        run.compiling.begin(run.model, progress.step, state.get("compile"))
        for line in changes + [remeasured, schedule_change(state["config"], state["world_size"], cfg, world.size,
                                                           n_train, progress.step, last_group)]:
            if line:
                run.say(line)
    else:
        run.compiling.begin(run.model, 0)
        if (cfg.overwrite_output_dir or cfg.resume_from == "auto") and world.main:  # the directory shows this run alone
            clear_run(run.out)
    global_batch = checkpoint.global_batch(cfg.batch_size, world.size, cfg.grad_accum_steps)[1]
    run.say(f"{run.total_steps} steps of {global_batch}, output {run.out}")
    if world.main:
        run.out.mkdir(parents=True, exist_ok=True)
    run.writer = summary_writer(run.out / "logs", world, purge_step=progress.step + 1 if run.resume else None)
    if run.resume is None:
        run.writer.add_text("config", "```\n" + json.dumps({**cfg.to_dict(), "precision": run.precision}, indent=2)
                            + "\n```")
    return progress


def fit(run: Run, progress: Progress, train_set, eval_loader: DataLoader) -> None:
    """Optimizer steps until the budget is spent or a signal arrives; evaluates, logs and checkpoints on the way.

    A signal is honoured after the step, or the evaluation batch, under way: a checkpoint, then exit."""
    cfg, world = run.cfg, run.world
    sampler = StepSampler(len(train_set), cfg.shuffle_seed, cfg.batch_size, world.size, world.rank,
                          cfg.grad_accum_steps)
    collate = run.objective.collator(run.tokenizer, cfg, False)
    # the bar closes however fit ends, so that an error is printed on a line of its own
    with tqdm(total=run.total_steps, initial=progress.step, desc="training", unit="step", dynamic_ncols=True,
              disable=not world.main) as bar, checkpoint.StopOnSignal() as signals:
        stop = functools.partial(stop_requested, run, signals)
        try:
            if progress.perplexity_before is None:
                progress.perplexity_before = perplexity(evaluate_at(run, eval_loader, 0, stop))
                run.say(f"perplexity before training: {progress.perplexity_before:.3f}")
            if progress.evaluating:  # a signal cut the checkpoint's step's evaluation short: it is done here
                scheduled_evaluation(run, progress, eval_loader, stop)
            run.trained.train()
            while progress.step < run.total_steps:  # one epoch, or what is left of it, per pass
                for micro in epoch_batches(run, train_set, collate, sampler, progress.epoch, progress.examples_done):
                    done = progress.step
                    loss_sum, tokens, seconds = step_or_eager(run, progress, micro)
                    if progress.step == done:
                        continue  # a spike, not applied (--skip-spikes): no step to count, evaluate or save
                    run.compiling.after_step(run.model, progress.step, seconds, run.total_steps - progress.step,
                                             world, run.say)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum / max(tokens, 1):.4f}")
                    if cfg.eval_every and progress.step % cfg.eval_every == 0:
                        scheduled_evaluation(run, progress, eval_loader, stop)
                    if cfg.save_steps and progress.step % cfg.save_steps == 0:
                        save_checkpoint(run, progress)
                    if cfg.sample_every and progress.step % cfg.sample_every == 0:
                        write_samples(run, progress.step)
                    if stop():
                        raise checkpoint.Stopped
                    if progress.step == run.total_steps:
                        break  # the budget may end mid-epoch
                if progress.step < run.total_steps and progress.examples_done != len(train_set):
                    raise RuntimeError(f"epoch {progress.epoch} ended after {progress.examples_done} of "
                                       f"{len(train_set)} examples")  # a bug: the loop would spin
                if progress.examples_done == len(train_set):  # every example of the epoch was trained on
                    evaluate_at(run, eval_loader, progress.step, stop)
                    progress.epoch, progress.examples_done = progress.epoch + 1, 0
                    if cfg.save_every:
                        save_checkpoint(run, progress)
        except checkpoint.Stopped:
            bar.close()
            stop_here(run, progress, signals.signum or signal.SIGTERM)


def scheduled_evaluation(run: Run, progress: Progress, eval_loader: DataLoader, stop) -> None:
    """--eval-every's evaluation of this step, marked in `progress` while under way: a signal that stops it
    checkpoints the step with the evaluation still to do, and the resumed run does it first."""
    progress.evaluating = True
    evaluate_at(run, eval_loader, progress.step, stop)
    progress.evaluating = False


def stop_requested(run: Run, signals: checkpoint.StopOnSignal) -> bool:
    """Whether a signal reached any rank (a collective: every rank asks at the same points)."""
    return distributed.all_sum(run.world, signals.signum is not None, device=run.device)[0] > 0


def step_or_eager(run: Run, progress: Progress, micro: list[dict]) -> tuple[float, int, float]:
    """train_step; if compiling fails (a compiler that can't build, at any step), the step again eagerly
    under --compile auto, and one error line under --compile on."""
    try:
        return train_step(run, progress, micro)
    except COMPILE_ERRORS as e:
        if not run.compiling.active:
            raise
        lines = [line for line in str(e).splitlines() if line.strip()]
        why = f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
        if run.cfg.compile == "on":
            raise UsageError(f"torch.compile failed at step {progress.step + 1} ({why}); run with --compile off"
                             ) from None
        run.say(f"compile failed at step {progress.step + 1} ({why}); eager from here", file=sys.stderr)
        run.optimizer.zero_grad(set_to_none=True)  # what the failed step's micro-batches added
        run.compiling.uncompile(progress.step)
        return train_step(run, progress, micro)


def train_step(run: Run, progress: Progress, micro: list[dict]) -> tuple[float, int, float]:
    """One optimizer step over this rank's micro-batches; records it in `progress`; (summed loss, tokens) of all ranks
    and this rank's seconds."""
    cfg, world, device, optimizer = run.cfg, run.world, run.device, run.optimizer
    started = time.perf_counter()
    log_now = (progress.step + 1) % cfg.log_every == 0 or progress.step + 1 == run.total_steps
    factor = lr_factor(progress.step, run.total_steps, run.warmup_steps, cfg.lr_scheduler, cfg.lr)
    lr = cfg.lr * factor  # train/lr: --lr's, though the first group may be a fresh head's at --head-lr
    # Each micro-batch's summed loss is divided by the labelled tokens of the whole step on all ranks,
    # so every token weighs the same however the step is split into micro-batches and processes
    # (DDP averages gradients: hence * world.size).
    real = [mb for mb in micro if not mb.get("idle")]
    labelled = [int((mb["labels"] != IGNORE).sum()) for mb in real]
    inputs = [int(mb["attention_mask"].count_nonzero()) for mb in real]  # it may number texts: 1, 2, ...
    flops = sum(step_flops(*run.flop_counts, mb["input_ids"].shape[1], i, n) for mb, i, n in zip(real, inputs, labelled))
    n_tokens, n_inputs, examples, flops = distributed.all_sum(
        world, sum(labelled), sum(inputs), sum(len(mb["input_ids"]) for mb in real), flops, device=device)
    scale = world.size / max(n_tokens, 1)
    step_loss, logs = torch.zeros((), device=device), {}
    for i, mb in enumerate(micro):
        input_ids, attention_mask, labels = (mb[k].to(device, non_blocking=True)
                                             for k in ("input_ids", "attention_mask", "labels"))
        with distributed.no_sync(run.trained, world, cfg.fsdp, sync=i == len(micro) - 1), autocast(device, run.precision):
            loss_sum, extra = loss_and_logs(run.trained(input_ids, attention_mask, labels))
        (run.scaler.scale(loss_sum * scale) if run.scaler else loss_sum * scale).backward()
        step_loss += loss_sum.detach()
        for name, value in extra.items():
            logs[name] = logs.get(name, 0.0) + value.detach()
    step_loss, *sums = distributed.all_sum(world, step_loss.item(), *(float(v) for v in logs.values()), device=device)
    if not math.isfinite(step_loss) and not cfg.skip_spikes:  # --skip-spikes skips it as a spike
        raise not_finite(run, progress, f"the training loss became {step_loss}")
    if run.scaler:
        run.scaler.unscale_(optimizer)
    before = layer_stats.before_step(run.parts) if run.parts and log_now else None
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP
    # a finite loss can still have NaN or infinite gradients: applied, they would turn every weight NaN (fp16's
    # scaler skips such a step itself; --skip-spikes skips it as a spike)
    if not (run.scaler or cfg.skip_spikes or math.isfinite(float(grad_norm))):
        raise not_finite(run, progress, f"the gradient norm became {float(grad_norm)} (the loss was {step_loss})")
    if cfg.skip_spikes and (spike := progress.spikes.judge(step_loss / max(n_tokens, 1), float(grad_norm),
                                                           cfg.skip_spikes)):
        skip_step(run, progress, spike, int(examples))
        return step_loss, n_tokens, time.perf_counter() - started
    set_lr(optimizer, factor)  # not before a spike is skipped: a checkpoint keeps the lr its last step ran at
    if run.scaler:
        run.scaler.step(optimizer)
        run.scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    seconds = time.perf_counter() - started
    progress.record(step_loss, int(n_tokens), int(n_inputs), int(examples), seconds, flops, dict(zip(logs, sums)))
    if log_now:
        log_window(run, progress.step, lr, float(grad_norm), progress.take_window())
    if before is not None:
        log_layers(run, progress.step, layer_stats.after_step(run.parts, before, sharded=cfg.fsdp))
    return step_loss, n_tokens, seconds


def not_finite(run: Run, progress: Progress, what: str) -> UsageError:
    """The error of a step that went non-finite, raised before it is applied: the last checkpoint is good."""
    last = checkpoint.latest(run.out)
    return UsageError(f"{what} at step {progress.step + 1}; " + (f"the last good checkpoint is {last}; " if last else "")
                      + "try a lower --lr or --precision fp32")


def skip_step(run: Run, progress: Progress, scores: dict[str, float], examples: int) -> None:
    """--skip-spikes: a step not applied. Its gradients are dropped and its examples used up; the weights, the
    optimizer and the schedule stay where they were. Its z-scores are logged at the step it would have been;
    spikes.MAX_IN_A_ROW of them in a row end the run."""
    run.optimizer.zero_grad(set_to_none=True)
    progress.skip(examples)
    step = progress.step + 1
    for name, z in scores.items():
        run.writer.add_scalar(f"spikes/{name}_z", z, step)
    run.say(f"step {step} not applied: a spike (z-scores: loss {scores['loss']:.1f}, gradient norm "
            f"{scores['grad_norm']:.1f}; --skip-spikes {run.cfg.skip_spikes:g})", file=sys.stderr)
    if progress.spikes.in_a_row >= spikes.MAX_IN_A_ROW:
        last = checkpoint.latest(run.out)
        raise UsageError(f"{spikes.MAX_IN_A_ROW} steps in a row were spikes (the last would have been step {step}): "
                         f"the loss or the gradient norm has left the range of the last {spikes.WINDOW} steps for "
                         "good; " + (f"resume from {last} " if last else "start again ")
                         + "with a higher --skip-spikes, a lower --lr, or without --skip-spikes")


def log_window(run: Run, step: int, lr: float, grad_norm: float, window: Window) -> None:
    """Training scalars averaged over the steps since the last log."""
    mean = window.per_token(window.loss_sum)
    run.writer.add_scalar("train/loss", mean, step)
    run.writer.add_scalar("train/perplexity", perplexity(mean), step)
    run.writer.add_scalar("train/lr", lr, step)
    run.writer.add_scalar("train/grad_norm", grad_norm, step)
    run.writer.add_scalar("train/tokens_per_sec", window.inputs / window.seconds, step)
    run.writer.add_scalar("train/mfu", model_flops_utilization(run, window.flops, window.seconds), step)
    run.writer.add_scalar("train/peak_memory_gib", memory.peak_memory(run.device) / memory.GIB, step)
    for name, value in window.logs.items():
        run.writer.add_scalar(f"train/{name}", window.per_token(value), step)


def log_layers(run: Run, step: int, stats: dict[str, dict[str, float]]) -> None:
    """--log-layers: layer_stats.after_step's statistics, one TensorBoard tag per statistic and part."""
    for stat, values in stats.items():
        for part, value in values.items():
            run.writer.add_scalar(f"{stat}/{part}", value, step)


def write_samples(run: Run, step: int) -> None:
    """--sample-every: the greedy continuation of each prompt, to the log and TensorBoard's text tab (rank 0)."""
    if not run.world.main:
        return
    tokenizer, written = run.tokenizer, []
    with run.compiling.stance(training=False):  # eagerly: no_grad and each prompt's length would recompile the layers
        for ids in samples.prompt_ids(tokenizer, run.prompts, cut=not run.cfg.sample_prompts):
            new = samples.greedy(run.model, ids, run.device, run.precision, run.block_size, tokenizer.eos_token_id)
            written.append((tokenizer.decode(ids), tokenizer.decode(new)))
            run.say(f"sample at step {step}: {written[-1][0]!r} -> {written[-1][1]!r}")
    run.writer.add_text("samples", samples.as_markdown(written), step)


def evaluate_at(run: Run, loader: DataLoader, step: int, stop=None) -> float:
    """The validation loss at `step` (computed once per step), logged to TensorBoard. `stop()` is asked
    before each batch: checkpoint.Stopped ends the evaluation when it says so."""
    if step not in run.evaluated:
        started = time.perf_counter()
        with run.compiling.stance(training=False):
            loss = evaluate(run.module, loader, run.device, run.precision, run.eval_world, stop)
        run.eval_seconds[step] = time.perf_counter() - started
        run.writer.add_scalar("eval/loss", loss, step)
        run.writer.add_scalar("eval/perplexity", perplexity(loss), step)
        if run.cfg.eval_stride:  # which windows produced the number
            run.writer.add_scalar("eval/stride", run.cfg.eval_stride, step)
        run.evaluated[step] = loss
    return run.evaluated[step]


def save_checkpoint(run: Run, progress: Progress) -> Path | None:
    """Write a checkpoint of the run as it stands (rank 0 writes; every rank takes part in the gathering)."""
    info = {"task": run.cfg.task, "model": run.model_name, "world_size": run.world.size, "config": run.cfg.to_dict(),
            "train_data": run.train_data, "compile": run.compiling.state(), "optimizer": describe(run.optimizer)}
    snapshot = checkpoint.capture(progress, info, run.model, run.optimizer, run.scaler, run.world, run.cfg.fsdp,
                                  partial=run.adapted is not None)
    # rank 0 writes while the others wait: a failed write is the same one-line error on every rank
    return distributed.run_on_main(run.world, lambda: checkpoint.save(run.out, snapshot, run.cfg.save_total_limit))


def stop_here(run: Run, progress: Progress, signum: int) -> None:
    """After a signal: checkpoint, tell how to resume, exit with 128 + the signal's number."""
    path = save_checkpoint(run, progress)
    run.writer.close()
    if run.world.main:
        print(f"stopped by signal {signum} at step {progress.step}; checkpoint {path}\n"
              f"resume with: {checkpoint.resume_command(distributed.launcher(), sys.argv, path)}", file=sys.stderr)
    raise SystemExit(128 + signum)


def finish(run: Run, progress: Progress | None, eval_loader: DataLoader, n_train: int) -> dict:
    """The final evaluation, metrics.json and run_clm.py's result files and, after training, the model and tokenizer."""
    step = progress.step if progress else 0
    eval_loss = evaluate_at(run, eval_loader, step)
    metrics = {"eval_loss": eval_loss, "perplexity": perplexity(eval_loss), "eval_stride": run.cfg.eval_stride,
               "precision": run.precision, "compiled": run.compiling.steps_compiled(step) > 0,
               "compiled_since": run.compiling.since, "model": run.model_name,
               "block_size": run.block_size, "world_size": run.world.size, "parameters": run.parameters[0],
               "trained_parameters": run.parameters[1]}
    if progress is None:  # --eval-only
        metrics["eval_tokens"] = eval_loader.dataset.num_tokens
        if run.cfg.merge_lora:  # a conversion: the adapter of --model ADAPTER_DIR merged into its base
            save_merged(run, run.adapter_dir, step)
    else:
        seconds = max(progress.train_seconds, 1e-9)
        metrics.update(perplexity_before=progress.perplexity_before, train_steps=step,
                       skipped_steps=progress.spikes.skipped,
                       train_tokens=progress.train_tokens, train_seconds=progress.train_seconds,
                       tokens_per_second=progress.train_tokens / seconds,
                       mfu=model_flops_utilization(run, progress.train_flops, progress.train_seconds))
        save_model(run, step)
    peaks = distributed.gather_to_main(run.world, memory.peak_memory(run.device))  # the highest of any process
    if run.world.main:
        metrics.update(peak_memory_gib=max(peaks) / memory.GIB,
                       planned_memory_gib=run.plan.total / memory.GIB if run.plan else None)
        run.out.mkdir(parents=True, exist_ok=True)
        write_json(run.out / "metrics.json", metrics)
        write_trainer_results(run.out, *trainer_results(run, progress, eval_loader, n_train))
    run.writer.close()
    if run.compiling.active:  # the compiled code holds this run's model: another run in this process recompiles
        torch._dynamo.reset()
    distributed.barrier(run.world)  # nobody leaves before the model is saved
    if progress is None:
        run.say(f"perplexity: {metrics['perplexity']:.4f}")
    else:
        run.say(f"perplexity: {metrics['perplexity_before']:.3f} -> {metrics['perplexity']:.3f}"
                + f" (MFU {metrics['mfu']:.1%})")
        if run.cfg.save_gguf and run.world.main:  # last: a failed write leaves the checkpoint and metrics whole
            save_gguf(run)
    return metrics


def save_gguf(run: Run) -> None:
    """--save-gguf: OUTPUT_DIR/model-TYPE.gguf from what the run saved (the model, the merged model, or the adapter
    added into its fp32 base)."""
    source = run.out / "merged" if adapted(run.cfg) and run.cfg.merge_lora else run.out
    gguf.export(source, run.cfg.save_gguf, gguf.gguf_path(run.out, run.cfg.save_gguf), run.cfg.cache_dir, run.say)


def scratch_name(cfg: Config) -> str:
    """How a model from scratch is named in metrics and checkpoints: its configuration and overrides."""
    return (f"{cfg.model_type or cfg.config_name} from scratch"
            + (f" ({cfg.config_overrides})" if cfg.config_overrides else ""))


def adapted(cfg: Config) -> bool:
    """Whether the run trains LoRA adapters: new ones (--lora-rank), or those of --model ADAPTER_DIR."""
    return cfg.lora_rank > 0 or is_adapter_dir(cfg.model)


def save_model(run: Run, step: int) -> None:
    """The trained model and its tokenizer in OUTPUT_DIR; under LoRA the adapter, and with --merge-lora the merged
    model in OUTPUT_DIR/merged. Every rank calls it (FSDP gathers); rank 0 writes."""
    if run.adapted is not None:  # never sharded: --fsdp is refused with LoRA
        if run.world.main:
            adapters.save(run.adapted, run.out, base_name(run))
    else:
        model_state, _ = distributed.full_state(run.model, sharded=run.cfg.fsdp)  # a collective under FSDP
        if run.world.main:
            run.model.save_pretrained(run.out, state_dict=model_state)
    if run.world.main:
        run.tokenizer.save_pretrained(run.out)
    if run.adapted is not None and run.cfg.merge_lora:
        save_merged(run, run.out, step)


def save_merged(run: Run, adapter_dir: Path | str, step: int) -> None:
    """--merge-lora: OUTPUT_DIR/merged, the adapter added into the base's fp32 weights, and the tokenizer (rank 0).
    A base kept in bf16 is read again in fp32 (adapters.merged_model), on the CPU, once the run has let go of its
    model: the merge then needs the fp32 model's memory, not that on top of the run's."""
    if not run.world.main:
        return
    if run.lowered:
        base = run.model_path
        let_go_of_model(run, step)
        model = adapters.merged_model(adapter_dir, base, run.objective.model_class)
    else:  # the base in memory is the original (loaded in fp32, or given as it is)
        model = adapters.merged(run.adapted)
    model.save_pretrained(run.out / "merged")
    run.tokenizer.save_pretrained(run.out / "merged")


def let_go_of_model(run: Run, step: int) -> None:
    """Drop what the run holds of its model (the model, its wrappers, the optimizer, compiled layers), freeing its
    memory: after the final evaluation and saving (at `step`), nothing reads them."""
    if run.compiling.active:
        run.compiling.uncompile(step)  # the compiled code holds the model's layers
    run.model = run.adapted = run.module = run.trained = run.optimizer = run.parts = None
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


def base_name(run: Run) -> str:
    """How an adapter names its base model: as --model gave it (a Hub name, an embedded default, a directory made
    absolute), or as the adapter it was trained from named it."""
    if run.adapter_dir:
        return adapters.adapter_base(run.adapter_dir)
    path = Path(run.model_path[0])
    return str(path.resolve()) if run.cfg.model and path.is_dir() else run.model_name


def trainer_results(run: Run, progress: Progress | None, eval_loader: DataLoader, n_train: int) -> tuple:
    """(train, eval) results under the keys that run_clm.py and run_mlm.py save (train: None after
    --eval-only). Runtimes count the training steps (and the final evaluation) alone; a resumed run's cover
    the whole run, as metrics.json's do."""
    step = progress.step if progress else 0
    seconds, samples = max(run.eval_seconds[step], 1e-9), len(eval_loader.dataset)
    evaluation = {"eval_loss": run.evaluated[step], "perplexity": perplexity(run.evaluated[step]),
                  "eval_samples": samples, "eval_runtime": run.eval_seconds[step],
                  "eval_samples_per_second": samples / seconds, "eval_steps_per_second": len(eval_loader) / seconds}
    if progress is None:
        return None, evaluation
    seconds, trained = max(progress.train_seconds, 1e-9), progress.epoch * n_train + progress.examples_done
    train = {"train_loss": progress.train_loss_sum / max(progress.train_loss_steps, 1),
             "train_runtime": progress.train_seconds, "train_samples": n_train,
             "train_samples_per_second": trained / seconds, "train_steps_per_second": progress.step / seconds,
             "total_flos": progress.train_flops, "epoch": trained / n_train}
    return train, {**evaluation, "epoch": train["epoch"]}


def model_flops_utilization(run: Run, flops: float, seconds: float) -> float:
    """Model FLOPs per second per device over the device's peak (the FLOPs the steps really did), at most 1:
    a rate above the peak raises the peak first, and says so (Peak.utilization)."""
    return run.peak.utilization(flops / max(seconds, 1e-9) / run.world.size, run.say)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (torch's on every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
