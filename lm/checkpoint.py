"""What a resumable checkpoint holds (listed once, in `Snapshot` and `FILES`), written atomically,
found again and loaded back; the options a resumed run may change; and the graceful stop that writes one.

A checkpoint is OUTPUT_DIR/checkpoints/step-N/ with the files of `FILES`. The data order and the
masks need no saved RNG: they are functions of (seed, epoch, example), and `Progress.examples_done`
counts the examples of the epoch already trained on by all processes together, so a run resumed
with another number of processes starts at the same place in the epoch's order.
"""

from __future__ import annotations

import dataclasses
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lm import distributed
from lm.errors import UsageError
from lm.optim import describe
from lm.spikes import Spikes

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


@dataclass
class Window:
    """Sums over the optimizer steps since the last log line, of all processes."""

    loss_sum: float = 0.0  # summed loss over the labelled tokens
    tokens: int = 0  # labelled tokens: what the loss is averaged over
    inputs: int = 0  # input tokens: what throughput counts
    seconds: float = 0.0
    flops: float = 0.0
    logs: dict = field(default_factory=dict)  # an objective's own summed values, e.g. an auxiliary loss

    def per_token(self, value: float) -> float:
        return value / max(self.tokens, 1)


@dataclass
class Progress:
    """Where a run stands: saved as state.json, and all a resumed run needs besides the tensors."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    examples_done: int = 0  # examples of this epoch trained on, by all processes together
    perplexity_before: float | None = None
    # this step's --eval-every evaluation is under way: a checkpoint a signal wrote meanwhile has it still to do
    evaluating: bool = False
    train_tokens: int = 0  # input tokens of all processes
    train_seconds: float = 0.0  # training steps only: no loading, no evaluation
    train_flops: float = 0.0  # model FLOPs of those steps, all processes (lm.hardware.step_flops)
    # run_clm.py's train_loss, the mean over the steps of each step's loss per token, as a sum and its steps: a
    # checkpoint written before these fields has steps that are in `step` but not in the sum
    train_loss_sum: float = 0.0
    train_loss_steps: int = 0
    window: Window = field(default_factory=Window)  # since the last log line
    spikes: Spikes = field(default_factory=Spikes)  # --skip-spikes: the recent steps a step is judged against

    def record(self, loss_sum: float, tokens: int, inputs: int, examples: int, seconds: float, flops: float,
               logs: dict) -> None:
        """Count one optimizer step (totals of all processes), in the run's totals and in the log window."""
        self.step += 1
        self.examples_done += examples
        self.train_tokens += inputs
        self.train_seconds += seconds
        self.train_flops += flops
        self.train_loss_sum += loss_sum / max(tokens, 1)
        self.train_loss_steps += 1
        w = self.window
        w.loss_sum, w.tokens, w.inputs, w.seconds, w.flops = (
            w.loss_sum + loss_sum, w.tokens + tokens, w.inputs + inputs, w.seconds + seconds, w.flops + flops)
        for name, value in logs.items():
            w.logs[name] = w.logs.get(name, 0.0) + value

    def skip(self, examples: int) -> None:
        """Count a step that was not applied (--skip-spikes): its examples are used up, nothing else changes."""
        self.examples_done += examples

    def take_window(self) -> Window:
        """The window so far; the next one starts empty."""
        window, self.window = self.window, Window()
        return window

    @classmethod
    def from_dict(cls, state: dict) -> "Progress":
        """The inverse of dataclasses.asdict, from a checkpoint's state.json (an older one lacks newer fields)."""
        fields = {f.name: state[f.name] for f in dataclasses.fields(cls) if f.name in state}
        return cls(**{**fields, "window": Window(**fields["window"]), "spikes": Spikes(**fields.get("spikes", {}))})


@dataclass
class Snapshot:
    """Everything in a checkpoint: the progress, the run it belongs to, and the tensors."""

    progress: Progress
    run: dict  # task, model, world_size, optimizer (its classes) and the whole config of the run that saved it
    model: dict  # the unwrapped model's state dict (no DDP, FSDP or compile prefixes); under LoRA what trains only
    optimizer: dict  # the optimizer's state, each one's when combined (keyed by parameter name under --fsdp)
    rng: list  # per process: python, numpy, torch CPU and CUDA generator states (dropout)
    scaler: dict | None = None  # the fp16 gradient scaler, if used


# Snapshot field -> its file; state.json holds `progress` and `run`.
FILES = {"model": "model.pt", "optimizer": "optimizer.pt", "rng": "rng.pt", "scaler": "scaler.pt"}


def save(output_dir: Path, snapshot: Snapshot, keep: int | None = None) -> Path:
    """Write checkpoints/step-N into a temporary directory, rename it into place, then prune to `keep`."""
    root = Path(output_dir) / DIRNAME
    final = root / f"step-{snapshot.progress.step}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step-*"):  # the partial write of a killed run: one run writes here at a time
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    except OSError as e:
        raise UsageError(f"cannot write a checkpoint in {root}: {e.strerror}") from None
    try:
        for name, filename in FILES.items():
            if getattr(snapshot, name) is not None:
                save_file(getattr(snapshot, name), tmp / filename)
        state = {**snapshot.run, **dataclasses.asdict(snapshot.progress)}
        (tmp / "state.json").write_text(json.dumps(state, indent=2))  # last: it marks a complete checkpoint
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


class _Writes:
    """A file for torch.save that keeps the OSError of a failed write: torch reports it as a RuntimeError
    about stream positions, which would hide a full disk behind a traceback."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def save_file(obj, path: Path) -> None:
    """torch.save to `path`; a failed write raises its OSError (no space, file too large, quota)."""
    with open(path, "wb") as f:
        writes = _Writes(f)
        try:
            torch.save(obj, writes)
        except RuntimeError:
            if writes.error is None:
                raise
            raise writes.error from None


def load(path: Path) -> Snapshot:
    """The inverse of save: a checkpoint's Snapshot, tensors on the CPU."""
    state = read_state(path)
    progress = Progress.from_dict(state)
    run = {k: v for k, v in state.items() if k not in {f.name for f in dataclasses.fields(Progress)}}
    tensors = {name: torch.load(Path(path) / filename, map_location="cpu", weights_only=True)  # data, never code
               if (Path(path) / filename).exists() else None for name, filename in FILES.items()}
    return Snapshot(progress, run, **tensors)


def capture(progress: Progress, run: dict, model, optimizer, scaler, world, sharded: bool,
            partial: bool = False) -> Snapshot | None:
    """The run as it stands: a Snapshot on rank 0, None elsewhere. Every rank calls it: it gathers.
    `partial` (LoRA): of the model, only what trains; the frozen rest is the base model's."""
    rng = distributed.gather_to_main(world, rng_state())
    model_state, optim_state = distributed.full_state(model, optimizer, sharded=sharded)
    if partial:
        model_state = {k: v for k, v in model_state.items() if k in trained_names(model)}
    if not world.main:
        return None
    return Snapshot(progress, run, model_state, optim_state, rng, scaler.state_dict() if scaler else None)


def restore(snapshot: Snapshot, model, optimizer, scaler, world, sharded: bool, say=print,
            partial: bool = False) -> Progress:
    """The inverse of capture, into the run's objects; the optimizer keeps this run's settings (lr, betas, ...)."""
    saved, this = snapshot.run.get("optimizer", "AdamW"), describe(optimizer)  # AdamW before any other existed
    if saved != this:
        raise UsageError(f"the checkpoint's optimizer is {saved}, this run's {this}: its state can't carry over; "
                         "resume with the optimizer it was saved with")
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if partial and set(snapshot.model) != trained_names(model) & set(model.state_dict()):
        raise UsageError("the checkpoint's trained tensors are not this run's (other LoRA adapters?); resume with "
                         "the settings it was saved with")
    distributed.load_full_state(model, optimizer, snapshot.model, snapshot.optimizer, sharded=sharded, strict=not partial)
    for group, ours in zip(optimizer.param_groups, settings):
        group.update(ours)  # a new --lr, --weight-decay, betas or eps applies from here on
    if scaler is not None and snapshot.scaler is not None:
        scaler.load_state_dict(snapshot.scaler)
    if len(snapshot.rng) != world.size:
        say(f"warning: the checkpoint was written by {len(snapshot.rng)} processes, this run has {world.size}: "
            "batches and masks stay the same, dropout draws differ", file=sys.stderr)
    set_rng_state(snapshot.rng[world.rank % len(snapshot.rng)])
    return snapshot.progress


def trained_names(model) -> set[str]:
    """The names of the parameters that train, every name of a tied one included (as state_dict lists them)."""
    return {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


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


def resolve(resume_from: str, output_dir: Path) -> Path | None:
    """The checkpoint directory that --resume-from names ('latest' and 'auto' look in the output dir); None where
    'auto' finds none, and the run starts afresh."""
    if resume_from in ("latest", "auto"):
        found = latest(output_dir)
        if found is None and resume_from == "latest":
            raise UsageError(f"--resume-from latest: no checkpoint in {Path(output_dir) / DIRNAME} (--resume-from "
                             "auto starts afresh where there is none)")
        return found
    path = Path(resume_from)
    if not is_checkpoint(path):
        raise UsageError(f"--resume-from {resume_from}: not a checkpoint (expected a "
                         f"{DIRNAME}/step-N directory with state.json and model.pt)")
    return path


def run_dir(resume_from: str | None) -> Path | None:
    """The run directory that holds the checkpoint `resume_from` names (OUT/checkpoints/step-N), or None."""
    if resume_from in (None, "latest", "auto"):
        return None
    path = Path(resume_from)
    return path.parent.parent if path.parent.name == DIRNAME else None


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / "state.json").read_text())


# How each option may differ between a checkpoint and the run that resumes it:
# - fixed: what decides the data, its order and the masks, and how perplexity is measured (perplexity_before
#   stays comparable); a change is refused;
# - the global batch, --batch-size x processes x --grad-accum-steps, must stay; its factors may change;
# - not compared: what this invocation does rather than how the run trains;
# - every other option may change and applies from the resumed step on; `check_resumable` lists them.
RESUME_FIXED = ("task", "model", "tokenizer", "model_type", "config_name", "config_overrides", "dataset",
                "dataset_config", "train_file", "validation_file", "text_column", "validation_split_percentage",
                "block_size", "line_by_line", "document_boundaries", "chat_template", "loss_on", "no_packing", "mlm_prob", "max_train_samples", "eval_stride",
                "seed", "data_seed", "fsdp", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "optimizer")
RESUME_GLOBAL_BATCH = ("batch_size", "grad_accum_steps")
RESUME_NOT_COMPARED = ("resume_from", "overwrite_output_dir", "prepare_only", "ignore_memory_plan")


def check_resumable(path: Path, cfg, model_name: str, world_size: int) -> list[str]:
    """Refuse a checkpoint that this run can't continue exactly; else one line per option that changed."""
    state = read_state(path)
    # an option newer than the checkpoint had its default there
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    saved = {**defaults, **state["config"], "model": state["model"]}
    ours = {**cfg.to_dict(), "model": model_name}
    differ = [k for k in RESUME_FIXED if saved.get(k) != ours.get(k)]
    if differ:
        what = ", ".join(f"{k}={saved.get(k)!r} (now {ours.get(k)!r})" for k in differ)
        raise UsageError(f"--resume-from {path}: the checkpoint is of a different run: {what}; "
                         "resume with the same settings, or start afresh in another --output-dir")
    before, now = (global_batch(c["batch_size"], n, c["grad_accum_steps"])
                   for c, n in ((saved, state["world_size"]), (ours, world_size)))
    if before[0] != now[0]:
        raise UsageError(f"--resume-from {path}: the checkpoint's global batch is {before[1]}, this run's {now[1]}; "
                         "keep the product the same (e.g. a larger --batch-size with fewer processes)")
    changes = [f"--{k.replace('_', '-')} {saved.get(k)} -> {ours[k]}" for k in ours
               if k not in RESUME_FIXED + RESUME_NOT_COMPARED and saved.get(k) != ours[k]]
    if state["world_size"] != world_size:
        changes.append(f"processes {state['world_size']} -> {world_size}")
    return [f"resume: {change} from step {state['step']}" for change in changes]


def check_same_data(path: Path, state: dict, train_data: dict) -> None:
    """Refuse a checkpoint whose training examples differ from this run's (a file changed under the same name):
    its place in the epoch would point elsewhere, or past the end."""
    saved, n = state.get("train_data"), train_data["examples"]
    if saved is None:  # written before checkpoints kept a digest: the count of examples trained must still fit
        same = state["examples_done"] <= n
    else:
        same = saved == train_data
    if not same:
        then = (f"{saved['examples']} training examples then, {n} now" if saved and saved["examples"] != n
                else f"{n} training examples, other tokens" if saved
                else f"{state['examples_done']} examples of its epoch trained, {n} in the data now")
        raise UsageError(f"--resume-from {path}: the training data is not the checkpoint's ({then}; did the "
                         "file change?); resume with the data the run started with, or start afresh in another "
                         "--output-dir")


def global_batch(batch_size: int, processes: int, accumulation: int) -> tuple[int, str]:
    """(examples per optimizer step, how they come about) for messages."""
    return (batch_size * processes * accumulation,
            f"{batch_size * processes * accumulation} examples (--batch-size {batch_size} x {processes} "
            f"process{'es' * (processes != 1)} x --grad-accum-steps {accumulation})")


def resume_command(launcher: list[str], argv: list[str], path: Path) -> str:
    """The shell command that continues this run from `path`: how it was launched, --resume-from replaced."""
    args, skip = [], False
    for arg in argv[1:]:
        if skip or arg.startswith("--resume-from="):
            skip = False
            continue
        skip = arg == "--resume-from"  # an earlier checkpoint of this run would repeat its steps
        if not skip:
            args.append(arg)
    return shlex.join([*launcher, argv[0], *args, "--resume-from", str(path)])


class Stopped(Exception):
    """A signal asked the run to stop: the loop writes a checkpoint and exits (raised where it was noticed)."""


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
