"""The memory plan against the measured peak: CLM and MLM, full and LoRA, gradient checkpointing off and on.

    python bench/memory_plan.py                 # the 8 configurations on the embedded defaults, ~10 min on 2 cores
    python bench/memory_plan.py --task mlm      # the 4 MLM ones, ~3 min
    python bench/memory_plan.py --device cuda --model clm=DIR/clm --model mlm=DIR/mlm

Each configuration trains a few steps in its own process (train_clm.py or train_mlm.py, batch 8 x 128 unless
told, --compile off: the plan counts an eager step), one after the other so that none shares the machine's
memory with another. Its metrics.json holds the plan's total (planned_memory_gib) and the process's peak
(peak_memory_gib: peak RSS on a CPU, what PyTorch allocated at most on a GPU). The table shows both, their
ratio, and the plan's line as the run printed it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's lm, not an installed one
TARGET = 0.20  # the plan within 20% of the measured peak


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("clm", "mlm", "both"), default="both")
    p.add_argument("--batch", type=int, default=8, help="blocks per step (default: 8)")
    p.add_argument("--block", type=int, default=128, help="tokens per block (default: 128)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (default: 4)")
    p.add_argument("--lora-rank", type=int, default=16, help="the LoRA configurations' rank (default: 16)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--model", action="append", default=[], metavar="TASK=DIR",
                   help="a checkpoint directory for a task (default: the task's embedded model)")
    return p.parse_args(argv)


def configurations(args) -> list[tuple[str, list[str]]]:
    """(task, extra flags) of every configuration: full and LoRA, gradient checkpointing off and on."""
    tasks = ("clm", "mlm") if args.task == "both" else (args.task,)
    return [(task, lora + checkpointing) for task in tasks for lora in ([], ["--lora-rank", str(args.lora_rank)])
            for checkpointing in ([], ["--gradient-checkpointing"])]


def run_one(args, task: str, extra: list[str], out: Path) -> dict:
    """Train one configuration in a fresh process; its metrics and the plan's line."""
    models = dict(spec.split("=", 1) for spec in args.model)
    cmd = [sys.executable, str(ROOT / f"train_{task}.py"), "--batch-size", str(args.batch), "--block-size",
           str(args.block), "--max-train-steps", str(args.steps), "--max-eval-samples", "16", "--log-every", "1",
           "--compile", "off", "--device", args.device, "--precision", args.precision, "--output-dir", str(out),
           *(["--model", models[task]] if task in models else []), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("memory: "))
    return {**json.loads((out / "metrics.json").read_text()), "line": line, "seconds": time.perf_counter() - started}


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from lm.hardware import machine_summary

    print(machine_summary(torch.device(args.device)))
    print(f"batch {args.batch} x {args.block}, {args.steps} steps, precision {args.precision}, compile off\n")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lm-bench-memory-") as tmp:
        for i, (task, extra) in enumerate(configurations(args)):
            m = run_one(args, task, extra, Path(tmp) / str(i))
            name = " ".join([task, *extra])
            ratio = m["planned_memory_gib"] / m["peak_memory_gib"]
            rows.append((name, m["planned_memory_gib"], m["peak_memory_gib"], ratio, m["line"]))
            print(f"{name}: planned {m['planned_memory_gib']:.2f} GiB, measured {m['peak_memory_gib']:.2f} GiB "
                  f"({ratio:.2f}x, {m['seconds']:.0f} s)", flush=True)
    measured = "peak allocated" if args.device == "cuda" else "peak RSS"
    print(f"\n| configuration | planned GiB | {measured} GiB | planned / measured | the plan's line |")
    print("|---|---|---|---|---|")
    for name, planned, peak, ratio, line in rows:
        print(f"| {name} | {planned:.2f} | {peak:.2f} | {ratio:.2f} | `{line}` |")
    within = sum(abs(ratio - 1) <= TARGET for *_, ratio, _ in rows)
    print(f"\nwithin {TARGET:.0%} of the measured peak: {within} of {len(rows)}")


if __name__ == "__main__":
    main()
