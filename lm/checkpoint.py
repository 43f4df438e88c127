"""What a resumable checkpoint holds (listed once), written atomically, found again, loaded;
and the graceful stop that writes one.

A checkpoint is OUTPUT_DIR/checkpoints/step-N/ with:
  model.pt      the model's full state dict (the unwrapped module: no DDP, FSDP or compile prefixes)
  optimizer.pt  AdamW state (keyed by parameter name under --fsdp);  scheduler.pt  LR schedule state;  scaler.pt  fp16 grad scaler, if used
  rng.pt        per rank: python, numpy, torch CPU and CUDA generator states (dropout)
  state.json    step, epoch, batches done in the epoch, the log window, task, model and config
The data order and the masks need no saved RNG: they are functions of (seed, epoch, example).
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from lm import distributed
from lm.errors import UsageError

DIRNAME = "checkpoints"
_STEP = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(output_dir: Path, state: dict, tensors: dict[str, object], keep: int | None = None) -> Path:
    """Write checkpoints/step-N into a temporary directory, rename it into place, then prune to `keep`.

    `tensors` maps file names (model.pt, optimizer.pt, ...: see the module docstring) to what goes in them.
    """
    root = Path(output_dir) / DIRNAME
    final = root / f"step-{state['step']}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    except OSError as e:
        raise UsageError(f"cannot write a checkpoint in {root}: {e.strerror}") from None
    try:
        for name, value in tensors.items():
            torch.save(value, tmp / name)
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        if final.exists():  # the same step saved twice (e.g. --save-every at an epoch's end)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest(output_dir)
        kept = f"; the last complete checkpoint {last} is intact" if last else ""
        raise UsageError(f"writing checkpoint {final.name} failed: {e.strerror or e}{kept}") from None
    if keep is not None:
        for old in all_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def all_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories start with a dot and never match)."""
    root = Path(output_dir) / DIRNAME
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and is_checkpoint(p)]
    return [p for _, p in sorted(found)]


def latest(output_dir: Path) -> Path | None:
    found = all_checkpoints(output_dir)
    return found[-1] if found else None


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / "state.json").is_file() and (Path(path) / "model.pt").is_file()


def resolve(resume_from: str, output_dir: Path) -> Path:
    """The checkpoint directory that --resume-from names ('latest' looks in the output dir)."""
    if resume_from == "latest":
        found = latest(output_dir)
        if found is None:
            raise UsageError(f"--resume-from latest: no checkpoint in {Path(output_dir) / DIRNAME}")
        return found
    path = Path(resume_from)
    if not is_checkpoint(path):
        raise UsageError(f"--resume-from {resume_from}: not a checkpoint (expected a "
                         f"{DIRNAME}/step-N directory with state.json and model.pt)")
    return path


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / "state.json").read_text())


def load_tensors(path: Path, name: str):
    return torch.load(Path(path) / name, map_location="cpu", weights_only=True)  # data, never code


# Options that fix which batches a run sees; a resumed run must keep them to stay exact.
RESUME_FIXED = ("task", "model", "dataset", "dataset_config", "train_file", "validation_file", "block_size",
                "line_by_line", "mlm_prob", "max_train_samples", "batch_size", "grad_accum_steps", "seed", "fsdp")


def check_resumable(path: Path, cfg, model_name: str) -> None:
    """Refuse a checkpoint of another task, model or data: resuming it could not be exact."""
    state = read_state(path)
    saved = {**state["config"], "model": state["model"]}
    ours = {**cfg.to_dict(), "model": model_name}
    differ = [k for k in RESUME_FIXED if saved.get(k) != ours.get(k)]
    if differ:
        what = ", ".join(f"{k}={saved.get(k)!r} (now {ours.get(k)!r})" for k in differ)
        raise UsageError(f"--resume-from {path}: the checkpoint is of a different run: {what}; "
                         "resume with the same settings, or start afresh in another --output-dir")


def restore(path: Path, model, optimizer, scheduler, scaler, world=distributed.World(), sharded=False) -> dict:
    """Load a checkpoint (already checked by check_resumable) into the run's objects; return its progress."""
    state = read_state(path)
    distributed.load_full_state(model, optimizer, load_tensors(path, "model.pt"),
                                load_tensors(path, "optimizer.pt"), sharded=sharded)
    scheduler.load_state_dict(load_tensors(path, "scheduler.pt"))
    if scaler is not None and (Path(path) / "scaler.pt").exists():
        scaler.load_state_dict(load_tensors(path, "scaler.pt"))
    rng = load_tensors(path, "rng.pt")  # one state per rank of the run that saved it
    if len(rng) != world.size and world.main:
        print(f"warning: the checkpoint was written by {len(rng)} processes, this run has {world.size}: "
              "the masks stay the same, the batches too if --batch-size x processes is unchanged, "
              "but dropout draws differ", file=sys.stderr)
    set_rng_state(rng[world.rank % len(rng)])
    return {k: state[k] for k in ("step", "epoch", "batches_done", "perplexity_before", "window",
                                  "train_tokens", "train_seconds")}


def resume_command(argv: list[str], path: Path) -> str:
    """The shell command that continues this run from `path`: argv with --resume-from replaced."""
    args, skip = [], False
    for arg in argv[1:]:
        if skip or arg.startswith("--resume-from="):
            skip = False
            continue
        skip = arg == "--resume-from"  # an earlier checkpoint of this run would repeat its steps
        if not skip:
            args.append(arg)
    return shlex.join(["python", os.path.basename(argv[0]) or "train.py", *args, "--resume-from", str(path)])


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
