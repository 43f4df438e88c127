"""Where a run writes: its output directory, TensorBoard on rank 0, and metrics files written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lm import checkpoint
from lm.errors import UsageError


def check_output_dir(out: Path, cfg, resume: Path | None) -> None:
    """Refuse to mix runs: another run's checkpoints stay untouched unless the user says otherwise."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file")
    if resume is None and checkpoint.all_checkpoints(out) and not cfg.overwrite_output_dir:
        raise UsageError(f"--output-dir {out} holds another run's checkpoints: continue it with --resume-from "
                         "latest, replace it with --overwrite-output-dir, or choose another --output-dir")
    parent = next(p for p in [out, *out.parents] if p.exists())
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--output-dir {out}: {parent} is not writable")


def summary_writer(log_dir: Path, world, purge_step=None):
    """TensorBoard writer on rank 0; elsewhere an object that drops every call."""
    if not world.main:
        return _Discard()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir, purge_step=purge_step)


class _Discard:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
