"""Where one training step's time goes, for the embedded default models: matmuls, attention, loss, ...

    python bench/profile_step.py                                  # clm and mlm, fp32 and bf16
    python bench/profile_step.py --task mlm --precision fp32      # MiniLM-L6: ~40 s on 2 busy cores
    python bench/profile_step.py --task clm --precision fp32      # SmolLM2-135M: ~1-3 min on 2 cores

For each task and precision: the embedded default model (SmolLM2-135M for clm, all-MiniLM-L6-v2
with a fresh head for mlm) inside TokenLoss, one batch of --batch blocks of --block tokens of the
embedded corpus made by the project's collator (fresh masks for mlm), and lm.train's step on it:
forward under the run's autocast, backward, gradient clipping, the fused AdamW step. --warmup steps
run first (the last one's wall time is the step's), then --steps under torch.profiler.

It prints, per configuration: the step's FLOPs (lm.hardware.step_flops, the labelled positions
counted for the head), the peak it is compared with (lm.hardware.resolve_peak: the GPU table,
else a matmul probe cached in CACHE_DIR/peak-flops.json, measured again if the step beats it) and so
the MFU; the profiled time in groups (matmul, attention, loss, casts, optimizer, fill/zero, other) as
shares of the step; the top 10 ops.
Times are self times (an op's own, without the ops it calls): on a CPU the host time of each op,
on CUDA the kernels' device time; so nothing counts twice. The head's matmuls, LinearCrossEntropy's
included, count as matmul; its logsumexp and softmax as loss. Where SDPA falls back to its math
path (on a CPU with attention dropout, as MiniLM's 0.1 in training), attention is bmm (matmul),
softmax and dropout (other): its own group then holds only the call's overhead.

A CPU without bf16 (AVX2 only) emulates bf16 matmuls: the probe's nn.Linear layout runs ~8x
slower than fp32, and backward's other layouts slower still. On the 2-core development machine a
bf16 mlm step takes about a minute and a bf16 clm step of SmolLM2 (8 x 128) over ten minutes. Such
an emulated bf16 configuration is skipped, with the estimate printed, when its step would take
longer than --max-emulated-seconds even at the measured peak (a real step takes some 6x longer):
by default bf16 clm there, so the default run takes ~5-10 minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's lm, not an installed one

import torch  # noqa: E402

from lm.config import Config, find_objective  # noqa: E402
from lm.data import blocks_of  # noqa: E402
from lm.embedded import cache_root, model_dir  # noqa: E402
from lm.hardware import (autocast, choose_attention, flop_counts, machine_summary, native_bf16,  # noqa: E402
                         probe_shapes, resolve_device, resolve_peak, step_flops, synchronize)
from lm.data import IGNORE  # noqa: E402
from lm.modeling import load_config, load_model, load_tokenizer  # noqa: E402
from lm.losses import TokenLoss  # noqa: E402
from lm.texts import TextList, python_docs_texts  # noqa: E402
from lm.token_cache import prepare  # noqa: E402
from lm.optim import build_optimizer, parameter_groups  # noqa: E402

# Groups of op (CPU) and kernel (CUDA) names, matched in this order, case-insensitively; the rest is "other".
GROUPS = (
    ("loss", r"log_?softmax|nll_loss|cross_entropy|logsumexp|LinearCrossEntropy"),
    ("attention", r"scaled_dot_product|flash|attention|fmha"),
    ("matmul", r"aten::(mm|addmm_?|bmm|baddbmm|matmul|linear)$|gemm|nvjet|cutlass|xmma"),
    ("casts", r"aten::(copy_|_to_copy|to)$|direct_copy"),
    ("optimizer", r"adam"),
    ("fill/zero", r"fill|zero"),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("clm", "mlm", "both"), default="both")
    p.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2, help="unprofiled steps first (default: 2)")
    p.add_argument("--steps", type=int, default=1, help="profiled steps (default: 1)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--max-emulated-seconds", type=float, default=30,
                   help="skip emulated bf16 (a CPU without it) where a step would take longer at the measured peak")
    return p.parse_args(argv)


def group_of(name: str) -> str:
    return next((group for group, pattern in GROUPS if re.search(pattern, name, re.IGNORECASE)), "other")


def real_batch(task: str, tokenizer, batch: int, block: int) -> dict:
    """The first `batch` blocks of the embedded corpus, through the task's own collator."""
    ids = prepare(TextList(python_docs_texts()[0]), tokenizer, cache_root(), 1, say=lambda *a, **k: None).tokens()
    items = [(i, torch.from_numpy(row.astype("int64"))) for i, row in enumerate(blocks_of(ids, block, "train")[:batch])]
    collate = find_objective(task).collator(tokenizer, Config.for_task(task, mlm_prob=0.15, seed=0), False)
    return collate(items)


def train_step(module, model, optimizer, batch: dict, device: torch.device, precision: str, max_norm: float) -> None:
    """lm.train's step on one micro-batch: forward, backward of the mean loss, clipping, AdamW."""
    input_ids, attention_mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    with autocast(device, precision):
        loss_sum = module(input_ids, attention_mask, labels)
    (loss_sum / (labels != IGNORE).sum()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed_step(*args) -> float:
    device = args[4]
    synchronize(device)
    started = time.perf_counter()
    train_step(*args)
    synchronize(device)
    return time.perf_counter() - started


def profile(task: str, precision: str, args, device: torch.device) -> None:
    """Load the task's default model afresh, then warm up, time, profile and report one configuration."""
    objective = find_objective(task)
    path = (str(model_dir(objective.embedded_model)), {})
    tokenizer = load_tokenizer(*path)
    attention, why = choose_attention(device, precision, load_config(*path), args.batch, args.block, cache_root())
    model, fresh = load_model(*path, objective.model_class, attention)
    model.to(device).train()
    module = TokenLoss(model)
    cfg = Config.for_task(task)
    optimizer = build_optimizer(parameter_groups(model, cfg.lr, cfg.weight_decay, fresh, cfg.head_lr), cfg)
    batch = real_batch(task, tokenizer, args.batch, args.block)
    inputs, predicted = int(batch["attention_mask"].sum()), int((batch["labels"] != IGNORE).sum())
    flops = step_flops(*flop_counts(model), seq_len=batch["input_ids"].shape[1], input_tokens=inputs,
                       predicted_tokens=predicted)
    peak = resolve_peak("auto", device, precision, probe_shapes(model.config, inputs), cache_root())
    print(f"\n== {task} {precision} on {device}: {find_objective(task).embedded_model}, batch {args.batch} x {args.block}, "
          f"{predicted} labelled positions, {flops / 1e9:.1f} GFLOP per step; peak {peak.flops / 1e9:.1f} GFLOP/s; "
          f"attention: {why}", flush=True)
    if precision == "bf16" and not native_bf16(device) and flops / peak.flops > args.max_emulated_seconds:
        print(f"skipped: emulated bf16, a step would take over {flops / peak.flops:.0f} s even at that peak (x"
              f"{args.warmup + args.steps} steps); raise --max-emulated-seconds to run it anyway")
        return
    step = (module, model, optimizer, batch, device, precision, cfg.max_grad_norm)
    wall = [timed_step(*step) for _ in range(args.warmup)]
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        profiled = [timed_step(*step) for _ in range(args.steps)]
    seconds = wall[-1] if wall else profiled[-1]
    mfu = peak.utilization(flops / seconds)  # a step faster than the peak raises it first, with a line
    print(f"wall time per step: {seconds:.2f} s ({'last warmup step' if wall else 'profiled'}), "
          f"{sum(profiled) / len(profiled):.2f} s profiled; MFU {mfu:.1%}")
    report(prof.key_averages(), args.steps, device)


def report(events, steps: int, device: torch.device) -> None:
    """Self time per group as shares of the profiled total, then the top 10 ops."""
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    times = [(e.key, getattr(e, attr) / steps / 1e3, e.count // steps) for e in events]  # ms per step
    times = [t for t in times if t[1] > 0]
    total = sum(ms for _, ms, _ in times)
    groups = defaultdict(float)
    for name, ms, _ in times:
        groups[group_of(name)] += ms
    print(f"{'group':<12}{'ms/step':>10}{'share':>8}")
    for group, ms in sorted(groups.items(), key=lambda g: -g[1]):
        print(f"{group:<12}{ms:>10.1f}{ms / total:>8.1%}")
    print(f"{'total':<12}{total:>10.1f}  ({'device' if device.type == 'cuda' else 'self CPU'} time)")
    print(f"top 10 ops by self time:\n{'op':<58}{'calls':>6}{'ms/step':>10}{'share':>8}  group")
    for name, ms, calls in sorted(times, key=lambda t: -t[1])[:10]:
        print(f"{name[:57]:<58}{calls:>6}{ms:>10.1f}{ms / total:>8.1%}  {group_of(name)}")


def main(argv=None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    tasks = ("clm", "mlm") if args.task == "both" else (args.task,)
    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)
    print(machine_summary(device))
    started = time.perf_counter()
    for task in tasks:
        for precision in precisions:
            profile(task, precision, args, device)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
