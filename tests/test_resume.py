"""Exact resume after SIGKILL, graceful stop on SIGINT/SIGTERM, and failures that keep the last checkpoint."""

from __future__ import annotations

import errno
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ENV, ROOT, run_script
from lm import checkpoint
from lm.config import Config
from lm.errors import UsageError
from lm.objectives import TokenLoss
from lm.train import train

STEPS = 12
HOOK = ROOT / "tests" / "signal_hook"  # its sitecustomize sends the run signals at a chosen step


def settings(model_dir: Path, corpus: Path, out: Path) -> dict:
    """A 12-step fp32 run over 8 blocks of 32 tokens, 2 per step: epochs end at steps 4, 8 and 12."""
    return dict(model=str(model_dir), train_file=str(corpus), block_size=32, batch_size=2, max_train_samples=8,
                max_train_steps=STEPS, lr=1e-3, precision="fp32", log_every=1, seed=1, output_dir=str(out))


def cli_args(model_dir, corpus, out, **extra) -> list[str]:
    args = []
    for name, value in {**settings(model_dir, corpus, out), **extra}.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def signalled_at(step: int, *names: str) -> dict:
    return {"PYTHONPATH": f"{HOOK}{os.pathsep}{ROOT}", "LM_TEST_SIGNAL_STEP": str(step),
            "LM_TEST_SIGNALS": ",".join(names)}


def logged_losses(out: Path) -> list[tuple[int, float]]:
    """(step, value) of train/loss as TensorBoard shows it (points a resumed run purged are gone)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def assert_same_weights(out: Path, reference: Path) -> None:
    ours, theirs = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert ours.keys() == theirs.keys()
    different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


@pytest.fixture(scope="session")
def reference(model_dirs, corpus, tmp_path_factory):
    """The uninterrupted run of a task, made on first use (no --save-every: saving must not matter)."""
    runs = {}

    def get(task: str) -> Path:
        if task not in runs:
            out = tmp_path_factory.mktemp(f"reference-{task}") / "run"
            result = run_script(task, *cli_args(model_dirs[task], corpus, out))
            assert result.returncode == 0, result.stderr
            runs[task] = out
        return runs[task]

    return get


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_sigkilled_run_resumes_exactly(task, model_dirs, corpus, reference, tmp_path):
    out = tmp_path / "run"
    args = cli_args(model_dirs[task], corpus, out, save_every=5)
    killed = run_script(task, *args, env=signalled_at(7, "SIGKILL"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [p.name for p in checkpoint.all_checkpoints(out)] == ["step-4", "step-5"]  # epoch end, --save-every
    assert [s for s, _ in logged_losses(out)] == list(range(1, 8))  # 6 and 7 will be trained again

    resumed = run_script(task, *args, "--resume-from", "latest")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "step-5 at step 5" in resumed.stdout
    assert_same_weights(out, reference(task))
    losses = logged_losses(out)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))  # no duplicated points
    assert losses == logged_losses(reference(task))  # steps 6-12 recomputed identically


@pytest.mark.parametrize("task, name", [("clm", "SIGINT"), ("mlm", "SIGTERM")])
def test_signal_finishes_step_saves_and_prints_resume_command(task, name, model_dirs, corpus, reference, tmp_path):
    out = tmp_path / "run"
    stopped = run_script(task, *cli_args(model_dirs[task], corpus, out), env=signalled_at(3, name))
    signum = getattr(signal, name)
    assert stopped.returncode == 128 + signum, stopped.stderr
    assert f"stopped by signal {signum} at step 3" in stopped.stderr
    assert [p.name for p in checkpoint.all_checkpoints(out)] == ["step-3"]
    command = stopped.stderr.split("resume with: ")[1].splitlines()[0]
    assert command.endswith(f"--resume-from {out / 'checkpoints' / 'step-3'}")

    python, *rest = shlex.split(command)
    assert python == "python"
    resumed = subprocess.run([sys.executable, *rest], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(out, reference(task))


def test_second_sigint_quits_at_once(model_dirs, corpus, tmp_path):
    out = tmp_path / "run"
    result = run_script("mlm", *cli_args(model_dirs["mlm"], corpus, out), env=signalled_at(3, "SIGINT", "SIGINT"))
    assert result.returncode == 130, result.stderr
    assert "again to quit at once" in result.stderr and "resume with" not in result.stderr
    assert checkpoint.all_checkpoints(out) == []


class NaNLossFrom(TokenLoss):
    """The real loss, turned NaN from the `step`-th training forward on (one forward per step here)."""

    def __init__(self, model, step: int):
        super().__init__(model)
        self.step, self.calls = step, 0

    def forward(self, input_ids, attention_mask, labels):
        loss = super().forward(input_ids, attention_mask, labels)
        if self.training:
            self.calls += 1
            if self.calls >= self.step:
                return loss * float("nan")
        return loss


def test_non_finite_loss_names_step_and_keeps_last_checkpoint(model_dirs, corpus, tmp_path):
    out = tmp_path / "run"
    cfg = Config.for_task("mlm", **settings(model_dirs["mlm"], corpus, out), save_every=5)
    with pytest.raises(UsageError, match=r"loss became nan at step 7; the last good checkpoint is .*step-5;"):
        train(cfg, loss=lambda model: NaNLossFrom(model, 7))
    assert [p.name for p in checkpoint.all_checkpoints(out)] == ["step-4", "step-5"]
    assert checkpoint.read_state(out / "checkpoints" / "step-5")["step"] == 5
    assert checkpoint.load(out / "checkpoints" / "step-5").model


def test_failed_checkpoint_write_keeps_previous_one(model_dirs, corpus, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run = dict(settings(model_dirs["mlm"], corpus, out), save_every=5, save_total_limit=1)
    real_save = torch.save

    def disk_full_at_step_8(obj, f, *args, **kwargs):
        if Path(f).parent.name.startswith(".step-8-") and Path(f).name == "optimizer.pt":  # model.pt written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_8)
    with pytest.raises(UsageError, match=r"checkpoint step-8 failed: No space left on device; .*step-5 is intact"):
        train(Config.for_task("mlm", **run))
    monkeypatch.undo()
    # --save-total-limit 1 pruned step-4 once step-5 was complete, and nothing of step-8 is left
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-5"]

    train(Config.for_task("mlm", **run, resume_from="latest"))
    assert_same_weights(out, reference("mlm"))
    assert [p.name for p in checkpoint.all_checkpoints(out)] == ["step-12"]
