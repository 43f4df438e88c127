"""What --log-layers costs, side by side: optimizer steps with and without the per-layer statistics, alternating in
one process on the same model and batch.

    python bench/log_layers.py                  # SmolLM2-135M (30 layers), batch 8 x 128: ~3 min on 2 cores (bf16)
    python bench/log_layers.py --scratch        # the 4-layer SmolLM2 from scratch of docs/research.md
    python bench/log_layers.py --precision fp32 --steps 10

A step is lm.train's: forward under the run's autocast, backward, gradient clipping, the optimizer step, zeroing the
gradients. A logged step adds lm.layer_stats' before_step (read the gradients, copy the weights) and after_step (the
change of the weights); at --log-every N one step in N is logged. Steps alternate plain / logged after --warmup
plain ones, so that drift of a shared machine falls on both alike. Reported: the median plain step, the median
time of the statistics within logged steps (timed on their own) and the difference of the two medians, each also
as a share of N plain steps: the cost at --log-every N.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's lm, not an installed one

import torch  # noqa: E402

from lm.config import Config  # noqa: E402
from lm.data import causal_labels  # noqa: E402
from lm.embedded import SMOLLM2, model_dir  # noqa: E402
from lm.hardware import autocast, choose_precision, machine_summary, native_bf16, resolve_device, synchronize  # noqa
from lm.layer_stats import after_step, before_step, model_parts  # noqa: E402
from lm.losses import TokenLoss  # noqa: E402
from lm.modeling import load_model, new_model, scratch_config  # noqa: E402
from lm.optim import build_optimizer, parameter_groups  # noqa: E402

SCRATCH = "num_hidden_layers=4,hidden_size=256,num_attention_heads=4,num_key_value_heads=2,intermediate_size=768"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scratch", action="store_true", help=f"a fresh SmolLM2 with {SCRATCH} instead of SmolLM2-135M")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--steps", type=int, default=12, help="steps of each kind (default: 12)")
    p.add_argument("--warmup", type=int, default=2, help="plain steps first, not timed (default: 2)")
    p.add_argument("--log-every", type=int, default=10, help="the interval the cost is reported for (default: 10)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    precision, _ = choose_precision(args.precision, device.type, native_bf16(device))
    path = str(model_dir(SMOLLM2))
    torch.manual_seed(0)
    if args.scratch:
        model = new_model(scratch_config(None, (path, {}), dict(kv.split("=") for kv in SCRATCH.split(","))),
                          "AutoModelForCausalLM", "sdpa")
    else:
        model, _ = load_model(path, {}, "AutoModelForCausalLM", "sdpa")
    model.to(device)
    module = TokenLoss(model).to(device)
    optimizer = build_optimizer(parameter_groups(model, 1e-4, 0.01), Config.for_task("clm"))
    parts = model_parts(model)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.block), device=device)
    mask = torch.ones_like(ids)
    labels = causal_labels(ids, mask)
    n_params = sum(p.numel() for p in parts.params)
    print(f"{'scratch 4-layer SmolLM2' if args.scratch else 'SmolLM2-135M'}: {n_params / 1e6:.1f}M trained "
          f"parameters in {len(parts.params)} tensors, {len(parts.names)} parts; batch {args.batch} x {args.block}, "
          f"{precision}; {machine_summary(device)}", flush=True)

    def step(logged: bool) -> tuple[float, float]:
        """(seconds of the step, of them the statistics')"""
        synchronize(device)
        started = time.perf_counter()
        with autocast(device, precision):
            loss = module(ids, mask, labels) / labels.numel()
        loss.backward()
        stats = 0.0
        if logged:
            t = time.perf_counter()
            before = before_step(parts)
            synchronize(device)
            stats += time.perf_counter() - t
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if logged:
            synchronize(device)
            t = time.perf_counter()
            after_step(parts, before)  # returns floats: synchronizes
            stats += time.perf_counter() - t
        synchronize(device)
        return time.perf_counter() - started, stats

    for _ in range(args.warmup):
        step(False)
    plain, logged, stats = [], [], []
    for i in range(2 * args.steps):
        seconds, in_stats = step(logged=i % 2 == 1)
        (logged if i % 2 else plain).append(seconds)
        if i % 2:
            stats.append(in_stats)
    step_s, logged_s, stats_s = (statistics.median(x) for x in (plain, logged, stats))
    n = args.log_every
    print(f"\n| | seconds | per logged step | at --log-every {n} |\n|---|---|---|---|")
    print(f"| plain step (median of {args.steps}) | {step_s:.4f} | | |")
    print(f"| logged step (median of {args.steps}) | {logged_s:.4f} | {logged_s / step_s - 1:+.1%} | "
          f"{(logged_s - step_s) / (n * step_s):+.2%} |")
    print(f"| the statistics within it (median) | {stats_s:.4f} | {stats_s / step_s:.1%} | "
          f"{stats_s / (n * step_s):.2%} |")


if __name__ == "__main__":
    main()
