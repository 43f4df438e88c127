"""Our loop against Hugging Face's Trainer on the embedded default model: tokens/s, peak memory, overhead.

    python bench/vs_trainer.py --task mlm            # MiniLM-L6, ~4-6 min on 2 cores
    python bench/vs_trainer.py --task clm            # SmolLM2-135M, ~8 min idle, ~23 min on a busy machine
    python bench/vs_trainer.py --task mlm --defaults # ours at --precision auto against Trainer's default (fp32)
    python bench/vs_trainer.py --task clm --device cuda --model DIR --precision bf16 --batch 32 --block 512

Each round trains once with each side, alternating which goes first, every run in a fresh
subprocess: the two never share a heap, and peak RSS (ru_maxrss) is the run's own. Both get the
same blocks in the same order, batch 8 x 128 unless told, the same AdamW (fused), schedule and clipping; Trainer
masks with DataCollatorForLanguageModeling, we with our collator. Timing starts after the warmup
steps: a step's wall time is the gap between two optimizer steps' ends, and tokens/s is the
window's tokens over its seconds. Memory is RSS: the whole process's peak (ours includes the final
evaluation and save_pretrained that train() does, Trainer saves nothing), and the peak over the
timed steps alone (the kernel's high-water mark, reset after warmup, read after the last step).
On CUDA the timed peak is the GPU memory PyTorch allocated, and MFU is against the datasheet peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's lm, not an installed one

SEED = 0
DEFAULTS = {"mlm": dict(rounds=3, steps=6, warmup=2), "clm": dict(rounds=3, steps=4, warmup=2)}
CUDA_DEFAULTS = dict(rounds=3, steps=50, warmup=10)
MAX_WARMUP = 40  # steps a side may take to settle before timing starts anyway
SETTLED = 0.10  # settled: the last 3 steps each within 10% of their median


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("clm", "mlm"), required=True)
    p.add_argument("--rounds", type=int, help="runs per side, alternating (default: 3)")
    p.add_argument("--steps", type=int, help="timed optimizer steps per run (default: mlm 6, clm 4)")
    p.add_argument("--warmup", type=int, help="untimed optimizer steps first, at least (default: 2; then on until "
                   "the step time settles, at most %d)" % MAX_WARMUP)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: our autocast against Trainer's bf16=True")
    p.add_argument("--defaults", action="store_true",
                   help="each side at its default precision: ours auto (bf16 where native), Trainer fp32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: every step waits for the GPU; fp32 is TF32 on both sides (default: cpu)")
    p.add_argument("--model", help="a checkpoint directory of the task's kind (default: the embedded model)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default: 8)")
    p.add_argument("--block", type=int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument("--compile", choices=("ours", "both"), help="ours: our --compile on against Trainer eager; "
                   "both: Trainer's torch_compile=True too (default: both eager; with --defaults ours is auto)")
    p.add_argument("--side", choices=("ours", "trainer"), help=argparse.SUPPRESS)  # one run, in a child
    args = p.parse_args(argv)
    for name, value in (CUDA_DEFAULTS if args.device == "cuda" else DEFAULTS[args.task]).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


class Timed(Exception):
    """Raised at the end of the last timed step: the run has measured what it was run for."""


class StepClock:
    """Times forward, backward, clipping and optimizer steps, and marks where each optimizer step ends."""

    def __init__(self, device: str = "cpu"):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self.busy: list[tuple[float, float]] = []  # (start, end) of forward, backward, clipping, optimizer step
        self.step_ends: list[float] = []
        self.cpu_ends: list[float] = []  # process CPU seconds at the same moments
        self.on_step_end = None
        self.watching = False  # steps count from the trained model's first: not the memory plan's trial step
        clock = self

        def before(*_):
            clock._start = time.perf_counter()

        def after_busy(*_):
            clock.busy.append((clock._start, time.perf_counter()))

        def after_step(*_):
            if not clock.watching:
                return
            if device == "cuda":  # the step ends when the GPU is done with it
                torch.cuda.synchronize()
            after_busy()
            clock.step_ends.append(time.perf_counter())
            clock.cpu_ends.append(time.process_time())
            if clock.on_step_end:
                clock.on_step_end(len(clock.step_ends))

        register_optimizer_step_pre_hook(before)
        register_optimizer_step_post_hook(after_step)
        backward = torch.Tensor.backward

        def timed_backward(tensor, *args, **kwargs):
            start = time.perf_counter()
            backward(tensor, *args, **kwargs)
            self.busy.append((start, time.perf_counter()))

        torch.Tensor.backward = timed_backward
        clip = torch.nn.utils.clip_grad_norm_

        def timed_clip(*args, **kwargs):  # part of the update: both sides clip just before stepping
            start = time.perf_counter()
            norm = clip(*args, **kwargs)
            self.busy.append((start, time.perf_counter()))
            return norm

        torch.nn.utils.clip_grad_norm_ = timed_clip
        self._before, self._after = before, after_busy

    def watch(self, module):
        """Count `module`'s forward as busy time; returns the module."""
        module.register_forward_pre_hook(self._before)
        module.register_forward_hook(self._after)
        self.watching = True
        return module

    def settled(self, at_least: int) -> bool:
        """Whether, after `at_least` steps, the last 3 step times are each within SETTLED of their median."""
        times = [b - a for a, b in zip(self.step_ends[-4:], self.step_ends[-3:])]
        if len(self.step_ends) < max(at_least, 4):
            return False
        middle = statistics.median(times)
        return all(abs(t - middle) <= SETTLED * middle for t in times)

    def window(self, warmup: int) -> dict:
        """Wall seconds, busy seconds and CPU seconds of the steps after the warmup ones."""
        start, end = self.step_ends[warmup - 1], self.step_ends[-1]
        busy = sum(b - a for a, b in self.busy if a >= start and b <= end)
        return {"seconds": end - start, "busy": busy, "steps": len(self.step_ends) - warmup, "warmup": warmup,
                "cpu_seconds": self.cpu_ends[-1] - self.cpu_ends[warmup - 1], "load": os.getloadavg()[0]}


def reset_peak_rss(device: str) -> None:
    """Restart the kernel's peak-RSS counter (VmHWM) of this process, Linux only (on CUDA: the GPU's peak)."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def current_peak_rss(device: str) -> int:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_side(args) -> dict:
    """One training run of one side in this process; returns its measurements."""
    import torch

    from lm.config import Config, find_objective
    from lm.embedded import model_dir
    from lm.memory import peak_rss

    clock = StepClock(args.device)
    total = MAX_WARMUP + args.steps  # the run is stopped once its steps are timed
    timed = {}

    def on_step_end(n):  # peak of the timed steps: from the end of warmup (every buffer built) to the last
        if "warmup" not in timed and (clock.settled(args.warmup) or n == MAX_WARMUP):
            timed["warmup"] = n
            reset_peak_rss(args.device)
        if "warmup" in timed and n == timed["warmup"] + args.steps:
            timed["rss"] = current_peak_rss(args.device)
            raise Timed

    clock.on_step_end = on_step_end
    cfg = Config.for_task(args.task, head_lr=None, batch_size=args.batch, block_size=args.block,
                          max_train_steps=total, max_train_samples=total * args.batch, max_eval_samples=1,
                          log_every=1, seed=SEED, device=args.device, precision=side_precision(args, args.side),
                          model=args.model, compile=side_compile(args))
    path = args.model or str(model_dir(find_objective(args.task).embedded_model))
    with tempfile.TemporaryDirectory(prefix="vs-trainer-") as out:
        if args.side == "ours":
            from lm.losses import TokenLoss
            from lm.train import train

            cfg.output_dir = out
            try:
                train(cfg, loss=lambda model: clock.watch(TokenLoss(model)))
            except Timed:
                pass
        else:
            try:
                train_with_trainer(cfg, path, out, clock, torch, args.compile == "both")
            except Timed:
                pass
    return {**clock.window(timed["warmup"]), "tokens_per_step": args.batch * args.block, "peak_rss": timed["rss"],
            "max_rss": peak_rss()}


def train_with_trainer(cfg, path: str, out: str, clock: StepClock, torch, trainer_compile: bool = False) -> None:
    """The usual Trainer setup on our blocks, fed in our order through a sequential sampler."""
    from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer,
                              DataCollatorForLanguageModeling, Trainer, TrainingArguments, default_data_collator)

    from lm.data import StepSampler, prepare_data
    from lm.distributed import World

    tokenizer = AutoTokenizer.from_pretrained(path)
    auto = AutoModelForCausalLM if cfg.task == "clm" else AutoModelForMaskedLM
    model = clock.watch(auto.from_pretrained(path, dtype=torch.float32))
    block = cfg.block_size
    examples, _ = prepare_data(cfg, tokenizer, block, World(), print)  # the blocks our side trains on
    order = StepSampler(len(examples), cfg.shuffle_seed, cfg.batch_size).order().tolist()
    if cfg.task == "clm":  # as run_clm.py: labels are the inputs, the model shifts them
        items = [{"input_ids": examples[i][1], "attention_mask": torch.ones(block, dtype=torch.long),
                  "labels": examples[i][1]} for i in order]
        collator = default_data_collator
    else:
        items = [{"input_ids": examples[i][1].tolist()} for i in order]
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=cfg.mlm_prob)
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum_steps,
        max_steps=cfg.max_train_steps, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_epsilon=cfg.adam_eps,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.log_every, save_strategy="no", report_to="none", use_cpu=cfg.device == "cpu", disable_tqdm=True,
        bf16=cfg.precision == "bf16", tf32=True if cfg.device == "cuda" else None, torch_compile=trainer_compile, train_sampling_strategy="sequential", dataloader_num_workers=0, seed=cfg.seed)
    Trainer(model=model, args=args, train_dataset=items, data_collator=collator).train()


def side_compile(args) -> str:
    """Our --compile: on with --compile ours or both; auto with --defaults; else off."""
    return "on" if args.compile else "auto" if args.defaults else "off"


def side_precision(args, side: str) -> str:
    """The precision a side trains at: --precision for both, or with --defaults each side's default."""
    if not args.defaults:
        return args.precision
    if side == "trainer":
        return "fp32"  # TrainingArguments' default: bf16=False
    from lm.hardware import choose_precision, native_bf16
    import torch

    return choose_precision("auto", args.device, native_bf16(torch.device(args.device)))[0]


def machine(device: str) -> str:
    import torch

    from lm.hardware import machine_summary

    return machine_summary(torch.device(device))


def utilization(args, results: dict[str, list[dict]]) -> None:
    """The machine's bf16/fp32 matmul ratio, measured now, and each side's MFU against its precision's peak.

    Both sides are charged the same model FLOPs per step, those our loop does (MLM head on the
    expected masked share only), so the MFU ratio is the speed ratio.
    """
    import torch
    import transformers

    from lm.config import find_objective
    from lm.embedded import model_dir
    from lm.hardware import Peak, flop_counts, probe_peak_flops, probe_shapes, step_flops, table_peak_flops

    objective = find_objective(args.task)
    config = transformers.AutoConfig.from_pretrained(args.model or model_dir(objective.embedded_model))
    with torch.device("meta"):
        counts = flop_counts(getattr(transformers, objective.model_class).from_config(config))
    tokens = args.batch * args.block
    predicted = args.batch * (args.block - 1) if args.task == "clm" else round(0.15 * tokens)
    flops = step_flops(*counts, args.block, tokens, predicted)
    shapes = probe_shapes(config, tokens)
    device = torch.device(args.device)
    probes = {p: sorted(probe_peak_flops(device, p, shapes)[0] for _ in range(3)) for p in ("fp32", "bf16")}
    peak = {p: Peak(rates[-1], "three probes now") for p, rates in probes.items()}  # fresh: the best of three
    for p, rates in probes.items():
        print(f"matmul peak {p} at the model's shapes, three probes now: "
              f"{', '.join(f'{r / 1e9:,.1f}' for r in rates)} GFLOP/s (spread {rates[-1] / rates[0] - 1:.1%})")
    print(f"bf16/fp32 matmul ratio {peak['bf16'].flops / peak['fp32'].flops:.2f}x")
    if device.type == "cuda":  # MFU against the datasheet, as usual for GPUs (the shapes' rate is printed above)
        peak = {p: Peak(table_peak_flops(device, p), "GPU table") if table_peak_flops(device, p) else peak[p]
                for p in peak}
    achieved = {side: statistics.median(r["steps"] / r["seconds"] for r in runs) * flops
                for side, runs in results.items()}
    for side, rate in achieved.items():  # first: a side faster than its peak raises it (with a line) for both sides
        peak[side_precision(args, side)].utilization(rate)
    for side, rate in achieved.items():
        p = side_precision(args, side)
        print(f"MFU {side}: {rate / peak[p].flops:.1%} of the {p} peak {peak[p].flops / 1e12:,.3f} TFLOP/s "
              f"({flops / 1e9:.1f} GFLOP per step)")


def run_child(args, side: str) -> dict:
    """Run one side in a fresh interpreter; its last stdout line is its JSON result."""
    cmd = [sys.executable, __file__, "--task", args.task, "--rounds", "1", "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--precision", args.precision, "--side", side, *["--defaults"] * args.defaults,
           "--device", args.device, "--batch", str(args.batch), "--block", str(args.block),
           *(["--compile", args.compile] if args.compile else []), *(["--model", args.model] if args.model else [])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{side} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(task: str, results: dict[str, list[dict]], seconds: float, device: str) -> None:
    gib = 2 ** 30
    timed = "peak GPU mem. timed" if device == "cuda" else "peak RSS timed steps"
    speed = {side: [r["tokens_per_step"] * r["steps"] / r["seconds"] for r in runs] for side, runs in results.items()}
    print(f"\n{'':8} {'tokens/s median (min-max)':>28} {'peak RSS process':>17} {timed:>21}")
    for side, name in (("ours", "ours"), ("trainer", "Trainer")):
        runs, s = results[side], speed[side]
        print(f"{name:8} {statistics.median(s):>10.1f} ({min(s):.1f}-{max(s):.1f}){'':>6}"
              f"{max(r['max_rss'] for r in runs) / gib:>11.2f} GiB{max(r['peak_rss'] for r in runs) / gib:>17.2f} GiB")
    cpu = {side: statistics.median(r["tokens_per_step"] * r["steps"] / r["cpu_seconds"] for r in runs)
           for side, runs in results.items()}
    print(f"tokens per CPU-second (less sensitive to other load on the machine), median: ours {cpu['ours']:.1f}, "
          f"Trainer {cpu['trainer']:.1f}, ratio {cpu['ours'] / cpu['trainer']:.2f}x")
    overhead = [1 - r["busy"] / r["seconds"] for r in results["ours"]]
    trainer_overhead = [1 - r["busy"] / r["seconds"] for r in results["trainer"]]
    print(f"step overhead (outside forward, backward, clipping, optimizer step), median: ours "
          f"{100 * statistics.median(overhead):.2f}% (max {100 * max(overhead):.2f}%), "
          f"Trainer {100 * statistics.median(trainer_overhead):.2f}%")
    print(f"total run time {seconds:.0f} s")
    print(f"{task} speedup vs Trainer: {statistics.median(speed['ours']) / statistics.median(speed['trainer']):.2f}x")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.side:
        print(json.dumps(run_side(args)))
        return
    precisions = {side: side_precision(args, side) for side in ("ours", "trainer")}
    print(f"{args.task}: batch {args.batch} x {args.block}, ours {precisions['ours']}, Trainer {precisions['trainer']}, "
          f"{machine(args.device)}," + (f" compiled: {args.compile}," if args.compile else "")
          + f" {args.rounds} rounds x {args.steps} timed steps per side, after at least {args.warmup} warmup steps and "
          f"until the step time settles (at most {MAX_WARMUP})", flush=True)
    started = time.perf_counter()
    results = {"ours": [], "trainer": []}
    for r in range(args.rounds):
        for side in (("ours", "trainer") if r % 2 == 0 else ("trainer", "ours")):
            res = run_child(args, side)
            results[side].append(res)
            print(f"round {r + 1} {side:7}: {res['tokens_per_step'] * res['steps'] / res['seconds']:8.1f} tokens/s, "
                  f"settled after {res['warmup']} steps, "
                  f"overhead {100 * (1 - res['busy'] / res['seconds']):.2f}%, "
                  f"peak RSS {res['max_rss'] / 2 ** 30:.2f} GiB, load average {res['load']:.1f}", flush=True)
    summarize(args.task, results, time.perf_counter() - started, args.device)
    utilization(args, results)


if __name__ == "__main__":
    main()
