"""What a resumable checkpoint holds (listed once), written atomically, found again, loaded.

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
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

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
