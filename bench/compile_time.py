"""What compiling costs and saves: eager against regional compilation (`--compile on`: each transformer layer)
and against the whole loss module compiled as one graph, cold (Inductor's cache empty) and warm, side by side.

    python bench/compile_time.py                     # CLM (SmolLM2-135M), bf16 where the CPU has it, ~6 min
    python bench/compile_time.py --task mlm --steps 12

Each run is a fresh process training --steps steps of 8 x 128 from the task's embedded model, with its own
--cache-dir (where Inductor's cache lives for the run). Cold: a new cache directory; warm: the same directory
again. A step's seconds come from its logged tokens/s; the compile's cost is the first step's time less the
median of the last half's, and the step time is that median. The process's wall time includes loading, the
evaluations (8 blocks, before and after) and, for the whole module, compiling evaluation's graph too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's lm, not an installed one


def child(task: str, argv: list[str], whole: bool) -> None:
    """Train in this process; `whole`: the objective's loss module compiled as one graph, --compile off."""
    import torch

    from lm.config import find_objective, parse_args
    from lm.train import train

    cfg = parse_args(task, argv)
    loss = (lambda model: torch.compile(find_objective(task).loss(model))) if whole else None
    train(cfg, loss=loss)


def step_seconds(out: Path, tokens_per_step: int) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs"), size_guidance={"scalars": 0})
    events.Reload()
    return [tokens_per_step / e.value for e in events.Scalars("train/tokens_per_sec")]


def run(args, name: str, cache: Path, out: Path) -> dict:
    flags = ["--max-train-steps", str(args.steps), "--batch-size", "8", "--block-size", "128", "--log-every", "1",
             "--max-eval-samples", "8", "--precision", args.precision, "--cache-dir", str(cache),
             "--output-dir", str(out), "--compile", "on" if name == "regional" else "off"]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, __file__, "--task", args.task, "--child", json.dumps(flags),
                             *(["--whole"] if name == "whole" else [])], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    seconds = step_seconds(out, 8 * 128)
    settled = statistics.median(seconds[len(seconds) // 2:])
    return {"first": seconds[0], "step": settled, "compile": seconds[0] - settled,
            "wall": time.perf_counter() - started}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("clm", "mlm"), default="clm")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one run in this process
    p.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.task, json.loads(args.child), args.whole)
    import torch

    from lm.hardware import machine_summary

    print(machine_summary(torch.device("cpu")))
    rows = {}
    with tempfile.TemporaryDirectory(prefix="lm-bench-compile-") as tmp:
        tmp = Path(tmp)
        rows["eager"] = run(args, "eager", tmp / "eager", tmp / "out-eager")
        for name in ("regional", "whole"):
            cache = tmp / name  # the embedded model is converted there once, by the cold run
            rows[f"{name}, cold"] = run(args, name, cache, tmp / f"out-{name}-cold")
            rows[f"{name}, warm"] = run(args, name, cache, tmp / f"out-{name}-warm")
    eager = rows["eager"]["step"]
    print(f"\n{args.task}, 8 x 128, {args.steps} steps, precision {args.precision}\n")
    print("| run | process s | first step s | compile s | step s | step vs eager |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        compile_s = "—" if name == "eager" else f"{r['compile']:.1f}"
        print(f"| {name} | {r['wall']:.0f} | {r['first']:.1f} | {compile_s} | {r['step']:.3f} | {eager / r['step']:.2f}x |")


if __name__ == "__main__":
    main()
