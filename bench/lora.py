"""Full fine-tuning against LoRA adapters on the embedded default model, side by side in one run: tokens/s,
peak memory, trainable parameters, and perplexity after the same number of steps.

    python bench/lora.py                         # CLM (SmolLM2-135M), rank 16, ~6 min on 2 cores
    python bench/lora.py --task mlm --rank 8     # MiniLM
    python bench/lora.py --precision fp32 --rounds 1

Each run is a fresh process running the task's script (so its peak RSS is its own), at the same
precision, batch, block, steps, seed and data; full fine-tuning at the task's default learning rate,
LoRA at its own default (10x). Rounds alternate which side goes first. tokens/s is the median of the
per-step rates logged after the warmup steps; perplexity is the validation perplexity after the last
step (at most --eval-samples blocks of the embedded corpus).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's lm, not an installed one
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("clm", "mlm"), default="clm")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="both sides alike (default: auto, bf16 where the CPU has it)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of tokens/s (default: 3)")
    p.add_argument("--rounds", type=int, default=2, help="runs per side, alternating (default: 2)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=64, help="validation blocks (default: 64)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one side's script in this process
    return p.parse_args(argv)


def child(args) -> None:
    """Run the task's script here, then report this process's peak RSS."""
    from lm.cli import main
    from lm.memory import peak_rss

    code = main(args.task, json.loads(args.child))
    print("BENCH " + json.dumps({"code": code, "max_rss": peak_rss()}))


def run_side(args, side: str, out: Path) -> dict:
    argv = ["--block-size", str(args.block), "--batch-size", str(args.batch), "--max-train-steps", str(args.steps),
            "--max-eval-samples", str(args.eval_samples), "--precision", args.precision, "--log-every", "1",
            "--compile", "off", "--seed", "0", "--output-dir", str(out)]
    if side == "lora":
        argv += ["--lora-rank", str(args.rank)]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--task", args.task, "--child", json.dumps(argv)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    report = next((json.loads(line[6:]) for line in done.stdout.splitlines() if line.startswith("BENCH ")), None)
    if done.returncode != 0 or report is None or report["code"] != 0:
        sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    rates = [value for step, value in scalars(out, "train/tokens_per_sec") if step > args.warmup]
    return {"tokens_per_sec": statistics.median(rates), "max_rss": report["max_rss"],
            "perplexity": metrics["perplexity"], "precision": metrics["precision"],
            "parameters": metrics["parameters"], "trained": metrics["trained_parameters"],
            "wall": time.perf_counter() - started}


def scalars(out: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    import torch

    from lm.hardware import machine_summary

    print(f"{args.task}: full fine-tuning against LoRA rank {args.rank} on every linear layer of the body, "
          f"batch {args.batch} x {args.block}, {args.steps} steps ({args.warmup} warmup), precision {args.precision}, "
          f"{args.rounds} rounds; {machine_summary(torch.device('cpu'))}", flush=True)
    results = {"full": [], "lora": []}
    with tempfile.TemporaryDirectory(prefix="lm-bench-lora-") as tmp:
        for r in range(args.rounds):
            for side in (("full", "lora") if r % 2 == 0 else ("lora", "full")):
                res = run_side(args, side, Path(tmp) / f"{side}-{r}")
                results[side].append(res)
                print(f"round {r + 1} {side:4}: {res['tokens_per_sec']:7.1f} tokens/s, peak RSS "
                      f"{res['max_rss'] / 2 ** 30:.2f} GiB, perplexity {res['perplexity']:.3f} "
                      f"({res['precision']}, {res['wall']:.0f} s)", flush=True)
    full, lora = ({k: statistics.median(r[k] for r in results[side]) for k in results[side][0] if k != "precision"}
                  for side in ("full", "lora"))
    print(f"\n| | full | LoRA r{args.rank} | LoRA / full |\n|---|---|---|---|")
    print(f"| trainable parameters | {full['trained']:,.0f} | {lora['trained']:,.0f} | "
          f"{lora['trained'] / full['trained']:.2%} |")
    print(f"| tokens/s (median) | {full['tokens_per_sec']:.1f} | {lora['tokens_per_sec']:.1f} | "
          f"{lora['tokens_per_sec'] / full['tokens_per_sec']:.2f}x |")
    print(f"| peak RSS | {full['max_rss'] / 2 ** 30:.2f} GiB | {lora['max_rss'] / 2 ** 30:.2f} GiB | "
          f"{lora['max_rss'] / full['max_rss']:.0%} |")
    print(f"| perplexity after {args.steps} steps | {full['perplexity']:.3f} | {lora['perplexity']:.3f} | "
          f"{lora['perplexity'] / full['perplexity']:.3f} |")


if __name__ == "__main__":
    main()
