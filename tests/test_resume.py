"""Exact resume after SIGKILL, graceful stop on SIGINT/SIGTERM, and failures that keep the last checkpoint."""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ENV, ROOT, WORDS, run_script
from lm import checkpoint
from lm.config import Config
from lm.errors import UsageError
from lm.losses import TokenLoss
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


def logged(out: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar as TensorBoard shows it (points a resumed run purged are gone)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def logged_losses(out: Path) -> list[tuple[int, float]]:
    return logged(out, "train/loss")


def train_loss(out: Path) -> float:
    return json.loads((out / "train_results.json").read_text())["train_loss"]


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
    assert train_loss(out) == train_loss(reference(task))  # Trainer's mean over the steps, carried in Progress


def launch(args: list[str], env: dict | None = None, seconds: float | None = None) -> subprocess.CompletedProcess:
    """train_clm.py as run_script runs it, sent SIGKILL after `seconds` if it is still running then."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_clm.py"), *args], cwd=ROOT, env={**ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_one_command_with_resume_auto_survives_sigkills_anywhere(model_dirs, corpus, reference, tmp_path):
    """--resume-from auto: the same command line, SIGKILLed before its first checkpoint, halfway through writing
    one, at a step and at a moment drawn at random, and run again unchanged, ends as the uninterrupted run does."""
    out = tmp_path / "run"
    args = [*cli_args(model_dirs["clm"], corpus, out, save_every=1), "--resume-from", "auto"]
    rng = random.Random(31)
    half_written, at_step = rng.randint(2, STEPS // 2), rng.randint(STEPS // 2 + 1, STEPS)
    hook = {"PYTHONPATH": f"{HOOK}{os.pathsep}{ROOT}"}

    started = time.perf_counter()
    first = launch(args, signalled_at(1, "SIGKILL"))  # step 1 trained and logged, its checkpoint not written
    to_step_1 = time.perf_counter() - started  # this machine's start-up, now
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert checkpoint.all_checkpoints(out) == [] and (out / "logs").is_dir()
    second = launch(args, {**hook, "LM_TEST_KILL_SAVING": str(half_written)})
    assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
    assert (f"--resume-from auto: no checkpoint in {out / 'checkpoints'}: starting afresh, replacing what a run "
            "without one left (logs)") in second.stdout
    assert checkpoint.latest(out).name == f"step-{half_written - 1}"
    assert [p.name for p in (out / "checkpoints").glob(f".step-{half_written}-*/*")] == ["model.pt"]
    # then a step, and a moment about where training runs (a step, a checkpoint, the final save: wherever it lands)
    for env, seconds in ((signalled_at(at_step, "SIGKILL"), None), (None, to_step_1 * rng.uniform(0.9, 1.3))):
        killed = launch(args, env, seconds)
        assert killed.returncode in (0, -signal.SIGKILL), killed.stderr[-3000:]
        assert "--resume-from auto: resuming from" in killed.stdout or killed.returncode != 0
    last = launch(args)
    assert last.returncode == 0, last.stderr[-3000:]

    assert_same_weights(out, reference("clm"))
    assert logged_losses(out) == logged_losses(reference("clm"))  # each step once, the values of one run
    assert train_loss(out) == train_loss(reference("clm"))
    assert json.loads((out / "metrics.json").read_text())["eval_loss"] == \
        json.loads((reference("clm") / "metrics.json").read_text())["eval_loss"]
    assert list((out / "checkpoints").glob(".step-*")) == []  # a later save removed the half-written one


def test_resume_auto_without_a_checkpoint_starts_afresh_over_the_logs_left(model_dirs, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    run = {**settings(model_dirs["clm"], corpus, out), "max_train_steps": 2}
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "events.out.tfevents.0.killed").write_bytes(b"")  # a run killed before its first checkpoint
    (out / "checkpoints" / ".step-1-x").mkdir(parents=True)  # and halfway through writing it
    with pytest.raises(UsageError, match="holds another run"):
        train(Config.for_task("clm", **run))
    with pytest.raises(UsageError, match="--resume-from latest: no checkpoint in"):  # latest stays strict
        train(Config.for_task("clm", **run, resume_from="latest"))
    train(Config.for_task("clm", **run, resume_from="auto"))
    assert (f"--resume-from auto: no checkpoint in {out / 'checkpoints'}: starting afresh, replacing what a run "
            "without one left (logs)\n") in capsys.readouterr().out
    assert [p.name for p in (out / "logs").iterdir() if p.name.endswith("killed")] == []
    assert [s for s, _ in logged_losses(out)] == [1, 2]
    assert not (out / "checkpoints").exists()


def test_resume_auto_needs_an_output_dir():
    with pytest.raises(UsageError, match="--resume-from auto resumes the run of --output-dir"):
        Config.for_task("clm", resume_from="auto")


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_a_run_with_document_boundaries_resumes_exactly(task, model_dirs, corpus, tmp_path):
    # texts kept apart come from the token cache, not the checkpoint: the resumed steps see the same blocks
    args = cli_args(model_dirs[task], corpus, tmp_path / "run", save_every=5) + ["--document-boundaries"]
    reference = run_script(task, *cli_args(model_dirs[task], corpus, tmp_path / "reference"), "--document-boundaries")
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = run_script(task, *args, env=signalled_at(7, "SIGKILL"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run_script(task, *args, "--resume-from", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-5 at step 5" in resumed.stdout and "reusing tokenized data" in resumed.stdout
    assert_same_weights(tmp_path / "run", tmp_path / "reference")
    assert logged_losses(tmp_path / "run") == logged_losses(tmp_path / "reference")
    different = run_script(task, *cli_args(model_dirs[task], corpus, tmp_path / "run"), "--resume-from", "latest")
    assert different.returncode == 2 and "document_boundaries=True (now False)" in different.stderr


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


class SpoiledFrom(TokenLoss):
    """The real loss, spoiled by `spoil` from the `step`-th training forward on (one forward per step here)."""

    def __init__(self, model, step: int):
        super().__init__(model)
        self.step, self.calls = step, 0

    def forward(self, input_ids, attention_mask, labels):
        loss = super().forward(input_ids, attention_mask, labels)
        if self.training:
            self.calls += 1
            if self.calls >= self.step:
                return self.spoil(loss)
        return loss


class NaNLossFrom(SpoiledFrom):
    def spoil(self, loss):
        return loss * float("nan")


class NaNGradientsFrom(SpoiledFrom):
    def spoil(self, loss):  # NaN gradients, the value unchanged: sqrt's slope at 0 is infinite, times 0 NaN
        return loss + torch.sqrt((next(self.model.parameters()) * 0).sum())


def test_non_finite_loss_names_step_and_keeps_last_checkpoint(model_dirs, corpus, tmp_path):
    out = tmp_path / "run"
    cfg = Config.for_task("mlm", **settings(model_dirs["mlm"], corpus, out), save_every=5)
    with pytest.raises(UsageError, match=r"loss became nan at step 7; the last good checkpoint is .*step-5;"):
        train(cfg, loss=lambda model: NaNLossFrom(model, 7))
    assert [p.name for p in checkpoint.all_checkpoints(out)] == ["step-4", "step-5"]
    assert checkpoint.read_state(out / "checkpoints" / "step-5")["step"] == 5
    assert checkpoint.load(out / "checkpoints" / "step-5").model


def test_non_finite_gradients_of_a_finite_loss_stop_before_the_step_is_applied(model_dirs, corpus, tmp_path):
    out = tmp_path / "run"
    cfg = Config.for_task("mlm", **settings(model_dirs["mlm"], corpus, out), save_every=5)
    with pytest.raises(UsageError, match=r"gradient norm became nan \(the loss was [0-9.]+\) at step 5; "
                                         r"the last good checkpoint is .*step-4;"):
        train(cfg, loss=lambda model: NaNGradientsFrom(model, 5))
    # applied, the step would have made every weight NaN, and step-5 a checkpoint of them
    saved = checkpoint.all_checkpoints(out)
    assert saved and all(torch.isfinite(t).all() for p in saved for t in checkpoint.load(p).model.values())


def test_failed_checkpoint_write_keeps_previous_one(model_dirs, corpus, reference, tmp_path):
    out = tmp_path / "run"
    args = cli_args(model_dirs["mlm"], corpus, out, save_every=5, save_total_limit=1)
    # after step 7 no file may grow past 1 MB: the step-8 checkpoint's model.pt (4 MB) fails as on a full disk
    full = run_script("mlm", *args, env={**signalled_at(7), "LM_TEST_FILE_LIMIT": str(1 << 20)})
    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("error: writing checkpoint step-8 failed: File too large; the last complete checkpoint ")
    assert last.endswith("step-5 is intact")
    # --save-total-limit 1 pruned step-4 once step-5 was complete, and nothing of step-8 is left
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-5"]

    resumed = run_script("mlm", *args, "--resume-from", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(out, reference("mlm"))
    assert [p.name for p in checkpoint.all_checkpoints(out)] == ["step-12"]


def test_progress_loads_from_a_checkpoint_written_before_its_newer_fields():
    import dataclasses

    state = dataclasses.asdict(checkpoint.Progress(step=5, epoch=1, examples_done=2))
    del state["train_loss_sum"], state["train_loss_steps"]
    progress = checkpoint.Progress.from_dict(state)
    assert (progress.step, progress.epoch, progress.train_loss_steps) == (5, 1, 0)
    progress.record(6.0, 3, 4, 2, 0.5, 1.0, {})
    assert progress.train_loss_sum / progress.train_loss_steps == 2.0  # the mean of the steps it has summed


# A valid value other than the base's, for every option: a new option without one fails the walk below,
# so whoever adds it decides how a resumed run treats it.
OTHER_VALUE = dict(
    task="mlm", model="other-model", tokenizer="other-tokenizer", model_type="llama", config_name="other-config",
    config_overrides="num_hidden_layers=2", dataset="wikitext", dataset_config="wikitext-2-raw-v1", train_file="other.txt",
    validation_file="other-valid.txt", text_column="body", validation_split_percentage=10.0, block_size=64,
    line_by_line=True, document_boundaries=True, chat_template="other.jinja", loss_on="all", no_packing=True,
    mlm_prob=0.2, eval_stride=8, max_train_samples=4,
    optimizer="muon", log_layers=True, skip_spikes=3.0, sample_every=5, sample_prompts="prompts.txt",
    max_eval_samples=3, lr=5e-4, head_lr=1e-2,
    weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.99, adam_eps=1e-6, lr_scheduler="cosine", warmup_steps=2,
    warmup_ratio=0.1, grad_accum_steps=2, max_grad_norm=0.5, epochs=2.0, max_train_steps=20, batch_size=4,
    eval_batch_size=3, seed=2, data_seed=3, device="cuda", precision="bf16", fsdp=True, ddp_timeout=60, compile="on",
    gradient_checkpointing=True, ignore_memory_plan=True, peak_flops=1e12, eval_every=2, eval_only=True, log_every=3,
    output_dir="elsewhere",
    overwrite_output_dir=True, save_every=7, save_total_limit=2, resume_from="latest", cache_dir="/tmp/other-cache",
    preprocessing_workers=1, prepare_only=True,
    lora_rank=8, lora_alpha=4.0, lora_dropout=0.1, lora_targets="c_attn", merge_lora=True, save_gguf="q8_0",
)


def test_every_option_has_a_resume_policy_and_it_holds(tmp_path):
    import dataclasses
    import json

    base = Config.for_task("clm", **settings(Path("m"), Path("c.txt"), tmp_path / "run"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "state.json").write_text(json.dumps({"config": base.to_dict(), "model": base.model, "world_size": 1,
                                                 "step": 5}))
    names = [f.name for f in dataclasses.fields(Config)]
    assert sorted(OTHER_VALUE) == sorted(names)
    for name in names:
        old, new = getattr(base, name), OTHER_VALUE[name]
        assert old != new, name
        changed = dataclasses.replace(base, **{name: new})
        model = changed.model
        if name in checkpoint.RESUME_FIXED:
            with pytest.raises(UsageError, match=rf"different run: {name}={old!r} \(now {new!r}\)"):
                checkpoint.check_resumable(ckpt, changed, model, 1)
        elif name in checkpoint.RESUME_GLOBAL_BATCH:
            with pytest.raises(UsageError, match=r"global batch is 2 examples \(--batch-size 2 x 1 process x "
                                                 r"--grad-accum-steps 1\), this run's 4 examples"):
                checkpoint.check_resumable(ckpt, changed, model, 1)
            # the same global batch, made up another way, is fine: 1 example x 2 processes
            assert checkpoint.check_resumable(ckpt, dataclasses.replace(base, batch_size=1), model, 2) == [
                "resume: --batch-size 2 -> 1 from step 5", "resume: processes 1 -> 2 from step 5"]
        elif name in checkpoint.RESUME_NOT_COMPARED:
            assert checkpoint.check_resumable(ckpt, changed, model, 1) == [], name
        else:  # may change: announced, applied from the resumed step on
            flag = name.replace("_", "-")
            assert checkpoint.check_resumable(ckpt, changed, model, 1) == [
                f"resume: --{flag} {old} -> {new} from step 5"], name


def test_resumed_run_applies_new_optimizer_settings_and_schedule(model_dirs, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    first = dict(settings(model_dirs["clm"], corpus, out), max_train_steps=6, save_every=3)
    train(Config.for_task("clm", **first))
    capsys.readouterr()
    changed = dict(first, lr=5e-4, weight_decay=0.1, adam_eps=1e-6, max_train_steps=10,
                   resume_from=str(out / "checkpoints" / "step-3"))
    train(Config.for_task("clm", **changed))
    printed = capsys.readouterr().out
    for line in ("resume: --lr 0.001 -> 0.0005 from step 3", "resume: --weight-decay 0.01 -> 0.1 from step 3",
                 "resume: --adam-eps 1e-08 -> 1e-06 from step 3", "resume: --max-train-steps 6 -> 10 from step 3",
                 "resume: linear schedule over 10 steps (0 warmup), was linear over 6 (0): lr at step 4 0.0005 -> 0.00035"):
        assert line in printed, printed
    lrs = logged(out, "train/lr")
    assert [s for s, _ in lrs] == list(range(1, 11))
    assert dict(lrs)[4] == pytest.approx(0.00035)  # the step the line names: the first resumed one
    expected = [1e-3 * (1 - s / 6) for s in range(3)] + [5e-4 * (1 - s / 10) for s in range(3, 10)]
    assert [v for _, v in lrs] == pytest.approx(expected, rel=1e-6)
    groups = checkpoint.load(out / "checkpoints" / "step-9").optimizer["param_groups"]
    assert {(g["weight_decay"], g["eps"], g["base_lr"]) for g in groups} == {(0.1, 1e-6, 5e-4), (0.0, 1e-6, 5e-4)}



def test_a_resumed_run_with_another_max_eval_samples_measures_perplexity_before_on_its_validation_set(
        model_dirs, corpus, tmp_path, capsys):
    first = dict(settings(model_dirs["clm"], corpus, tmp_path / "run"), validation_file=str(corpus),
                 max_eval_samples=2, max_train_steps=3, save_every=2)
    two_blocks = train(Config.for_task("clm", **first))["perplexity_before"]
    initial = train(Config.for_task("clm", **dict(first, max_eval_samples=5, eval_only=True,
                                                  output_dir=str(tmp_path / "initial"))))["perplexity"]
    capsys.readouterr()
    resumed = train(Config.for_task("clm", **dict(first, max_eval_samples=5,
                                                  resume_from=str(tmp_path / "run" / "checkpoints" / "step-2"))))
    assert resumed["perplexity_before"] == initial != two_blocks  # the model as it began, on the 5 blocks
    assert (f"resume: perplexity before training {two_blocks:.3f} -> {initial:.3f}, measured again on this run's "
            "validation set") in capsys.readouterr().out


def test_the_printed_resume_command_continues_the_same_run_directory(model_dirs, corpus, reference, tmp_path):
    # no --output-dir: the run goes to runs/<task>-<time>, and the resumed run must go on there
    args = [a for a in cli_args(model_dirs["clm"], corpus, tmp_path / "unused") if "unused" not in a]
    args.remove("--output-dir")
    stopped = subprocess.run([sys.executable, str(ROOT / "train_clm.py"), *args], cwd=tmp_path, capture_output=True,
                             text=True, env={**ENV, **signalled_at(3, "SIGTERM")})
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    python, *rest = shlex.split(stopped.stderr.split("resume with: ")[1].splitlines()[0])
    resumed = subprocess.run([sys.executable, *rest], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs
    assert_same_weights(runs[0], reference("clm"))
    assert [s for s, _ in logged_losses(runs[0])] == list(range(1, STEPS + 1))


def test_overwrite_output_dir_starts_tensorboard_and_checkpoints_afresh(model_dirs, corpus, tmp_path):
    out = tmp_path / "run"
    first = run_script("clm", *cli_args(model_dirs["clm"], corpus, out, max_train_steps=3, save_every=1))
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_script("clm", *cli_args(model_dirs["clm"], corpus, out, max_train_steps=2))
    assert again.returncode == 2 and ("holds another run (checkpoints, logs, metrics.json, train_results.json, "
                                      "eval_results.json, all_results.json)") in again.stderr
    over = run_script("clm", *cli_args(model_dirs["clm"], corpus, out, max_train_steps=2), "--overwrite-output-dir")
    assert over.returncode == 0, over.stderr[-3000:]
    assert [s for s, _ in logged_losses(out)] == [1, 2]
    assert [s for s, _ in logged(out, "eval/loss")] == [0, 2]
    assert checkpoint.all_checkpoints(out) == []


def test_a_train_file_that_changed_since_the_checkpoint_is_refused_not_spun(model_dirs, corpus, tmp_path):
    # 6 steps of 8 examples, then the file is cut to its first 20 lines: fewer blocks than the 32 examples
    # the step-4 checkpoint had trained of its epoch; resuming from it used to spin forever, deaf to SIGTERM
    rng = random.Random(0)
    text = tmp_path / "train.txt"
    text.write_text("".join(" ".join(rng.choices(WORDS, k=12)) + ".\n" for _ in range(80)))
    args = ["--model", model_dirs["clm"], "--train-file", text, "--validation-file", corpus, "--block-size", "16",
            "--batch-size", "8",
            "--max-train-steps", "6", "--save-every", "4", "--precision", "fp32", "--output-dir", tmp_path / "run"]
    assert run_script("clm", *args).returncode == 0
    step_4 = tmp_path / "run" / "checkpoints" / "step-4"
    assert checkpoint.read_state(step_4)["examples_done"] == 32
    text.write_text("".join(text.read_text().splitlines(keepends=True)[:20]))
    resumed = run_script("clm", *args, "--resume-from", step_4, timeout=120)
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    error = resumed.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: --resume-from {step_4}: the training data is not the checkpoint's (") \
        and "did the file change?" in error, error
    # a checkpoint written before checkpoints kept a digest: the count it trained must still fit the data
    old = {k: v for k, v in checkpoint.read_state(step_4).items() if k != "train_data"}
    with pytest.raises(UsageError, match=r"\(32 examples of its epoch trained, 9 in the data now; did the file"):
        checkpoint.check_same_data(step_4, old, {"examples": 9, "digest": "any"})
    checkpoint.check_same_data(step_4, old, {"examples": 32, "digest": "any"})  # fits: resumes as before


def test_a_signal_during_an_evaluation_stops_it_at_the_next_batch_and_the_resumed_run_does_it(model_dirs, corpus,
                                                                                              tmp_path):
    # SIGTERM right after step 2's loss is logged, before its evaluation of 20 batches: the run writes
    # step 2's checkpoint and exits without finishing (or logging) that evaluation; resumed, it evaluates step 2
    # first, as the uninterrupted run did
    out = tmp_path / "run"
    args = cli_args(model_dirs["mlm"], corpus, out, eval_every=2, eval_batch_size=1)
    stopped = run_script("mlm", *args, env=signalled_at(2, "SIGTERM"))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "stopped by signal 15 at step 2" in stopped.stderr
    assert [s for s, _ in logged(out, "eval/loss")] == [0]  # before training only: step 2's was cut short
    assert [p.name for p in checkpoint.all_checkpoints(out)] == ["step-2"]
    resumed = run_script("mlm", *args, "--resume-from", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted = run_script("mlm", *cli_args(model_dirs["mlm"], corpus, tmp_path / "whole", eval_every=2,
                                                eval_batch_size=1))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert logged(out, "eval/loss") == logged(tmp_path / "whole", "eval/loss")  # steps 0, 2, 4, ..., 12


def test_a_checkpoint_whose_constant_schedule_warmed_up_says_so_on_resume(model_dirs, corpus, tmp_path, capsys):
    # Before constant_with_warmup existed, `constant` warmed up; such a checkpoint's config says constant
    # with warmup steps. Made here by renaming the schedule in a checkpoint that did warm up.
    import json

    out = tmp_path / "run"
    first = dict(settings(model_dirs["clm"], corpus, out), max_train_steps=6, save_every=3, warmup_steps=4,
                 lr_scheduler="constant_with_warmup")
    train(Config.for_task("clm", **first))
    state_file = out / "checkpoints" / "step-3" / "state.json"
    state = json.loads(state_file.read_text())
    state["config"]["lr_scheduler"] = "constant"
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    again = dict(first, lr_scheduler="constant", resume_from=str(out / "checkpoints" / "step-3"))
    train(Config.for_task("clm", **again))
    printed = capsys.readouterr().out
    assert ("resume: the checkpoint's step 3 ran at lr 0.0005, where its settings now give 0.001: its 'constant' "
            "schedule warmed up, as constant_with_warmup does now; pass --lr-scheduler constant_with_warmup to keep "
            "that; lr at step 4 0.001") in printed, printed
