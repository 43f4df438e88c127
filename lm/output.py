"""Where a run writes: its output directory, TensorBoard on rank 0, and metrics files written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from lm import checkpoint
from lm.errors import UsageError


def check_output_dir(out: Path, cfg, resume: Path | None) -> None:
    """Refuse to mix runs: another run's checkpoints and logs stay untouched unless the user says otherwise
    (--overwrite-output-dir, or --resume-from auto where the run left no checkpoint: it is started again)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file")
    found = earlier_run(out)
    if resume is None and found and not (cfg.overwrite_output_dir or cfg.resume_from == "auto"):
        resumable = "checkpoints" in found
        raise UsageError(f"--output-dir {out} holds another run ({', '.join(found)}): "
                         + ("continue it with --resume-from latest, " if resumable else "")
                         + "replace it with --overwrite-output-dir, or choose another --output-dir")
    parent = next(p for p in [out, *out.parents] if p.exists())
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--output-dir {out}: {parent} is not writable")


# The result files run_clm.py and run_mlm.py write: each split's, and their union.
TRAINER_RESULTS = ("train_results.json", "eval_results.json", "all_results.json")
# What a run leaves in its directory besides the saved model, which the next run's overwrites.
RUN_FILES = ("checkpoints", "logs", "metrics.json", *TRAINER_RESULTS)


def earlier_run(out: Path) -> list[str]:
    """What an earlier run left in `out`: complete checkpoints, TensorBoard logs, metrics."""
    found = [name for name in RUN_FILES[1:] if (out / name).exists()]
    return (["checkpoints"] if checkpoint.all_checkpoints(out) else []) + found


def clear_run(out: Path) -> None:
    """Remove an earlier run's checkpoints, logs and metrics from `out` (--overwrite-output-dir; --resume-from auto
    where there is no complete checkpoint)."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


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
    """Write JSON through a temporary file renamed into place, so readers never see half a file; the file
    gets the permissions the umask gives a new file (readable by others, as a shared cache needs), and a
    failed write leaves no temporary file behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def umask() -> int:
    """This process's umask (read without changing it where /proc tells)."""
    try:
        return int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                        if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def write_trainer_results(out: Path, train: dict | None, evaluation: dict) -> None:
    """TRAINER_RESULTS in `out`: train_results.json (unless `train` is None), eval_results.json, all_results.json."""
    if train is not None:
        write_json(out / TRAINER_RESULTS[0], train)
    write_json(out / TRAINER_RESULTS[1], evaluation)
    write_json(out / TRAINER_RESULTS[2], {**(train or {}), **evaluation})
