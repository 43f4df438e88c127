"""--skip-spikes: the z-scores, and a spike that is flagged, skipped and leaves no trace in the weights, the optimizer
state, the schedule or the detector; exact resume with --log-layers and --skip-spikes on."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import scalars
from lm.config import Config, parse_args
from lm.errors import UsageError
from lm.losses import TokenLoss
from lm.spikes import MIN_STEPS, WINDOW, Spikes, z_score
from lm.train import train


def test_z_score_is_the_distance_above_the_window_mean_in_its_standard_deviations():
    window = [1.0, 2.0, 3.0, 4.0, 5.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # mean 3, population std sqrt(2)
    assert z_score(window, 3.0 + 2 * math.sqrt(2)) == pytest.approx(2.0)
    assert z_score(window, 1.0) == pytest.approx(-math.sqrt(2))  # below the mean: never a spike
    assert z_score(window[:MIN_STEPS - 1], 1e9) == 0.0  # too few steps to judge
    assert z_score(window, float("nan")) == z_score(window, float("inf")) == math.inf
    assert z_score([2.0] * MIN_STEPS, 2.0) == 0.0 and z_score([2.0] * MIN_STEPS, 2.1) == math.inf


def test_a_spike_is_counted_and_kept_out_of_the_window():
    spikes = Spikes()
    for i in range(WINDOW + 5):
        assert spikes.judge(3.0 + 0.01 * (i % 7), 1.0 + 0.01 * (i % 5), limit=6.0) is None
    assert len(spikes.losses) == len(spikes.grad_norms) == WINDOW  # the last WINDOW applied steps
    before = (list(spikes.losses), list(spikes.grad_norms))
    scores = spikes.judge(3.0, 5.0, limit=6.0)  # an ordinary loss, a gradient norm far above the rest
    assert scores["loss"] < 6.0 < scores["grad_norm"] and (spikes.skipped, spikes.in_a_row) == (1, 1)
    assert (spikes.losses, spikes.grad_norms) == before
    assert spikes.judge(3.02, 1.02, limit=6.0) is None and (spikes.skipped, spikes.in_a_row) == (1, 0)


@pytest.mark.parametrize("argv, message", [
    (["--skip-spikes", "0"], "--skip-spikes must be positive, got 0.0"),
    (["--skip-spikes", "4", "--precision", "fp16"], "fp16's gradient scaler skips the steps that overflow itself"),
])
def test_bad_spike_settings(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args("clm", argv)


class Spike(TokenLoss):
    """The objective's loss, 50 times larger at the `at`-th training forward (1-based): a loss spike, and a
    gradient spike with it."""

    def __init__(self, model, at: int | None):
        super().__init__(model)
        self.at, self.calls = at, 0

    def forward(self, input_ids, attention_mask, labels):
        loss = super().forward(input_ids, attention_mask, labels)
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                return loss * 50
        return loss


STEPS, SPIKE = 20, 14


@pytest.fixture(scope="module")
def same_blocks(tmp_path_factory):
    """A .txt whose 32-token blocks are all alike (16 MiniLM tokens a line): a step that skips its batch trains on
    the same data as one that never had it."""
    path = tmp_path_factory.mktemp("same") / "train.txt"
    path.write_text("the model reads a line of text and learns which word comes next.\n" * 48)
    return path


def run(model_dir, data, out, spike_at=None, **extra) -> dict:
    cfg = Config.for_task("clm", model=str(model_dir), train_file=str(data), block_size=32, batch_size=2,
                          max_train_steps=STEPS, lr=1e-3, precision="fp32", compile="off", log_every=2,
                          output_dir=str(out), **extra)
    return train(cfg, loss=lambda model: Spike(model, spike_at))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def optimizer_tensors(out) -> dict:
    state = torch.load(out / "checkpoints" / f"step-{STEPS}" / "optimizer.pt")["state"]
    return {f"{i}.{k}": v for i, s in state.items() for k, v in s.items()}


def test_a_loss_spike_is_skipped_as_if_it_never_ran(no_dropout_models, same_blocks, tmp_path):
    model = no_dropout_models["clm"]
    never = run(model, same_blocks, tmp_path / "never", skip_spikes=5.0, save_every=STEPS)
    skipped = run(model, same_blocks, tmp_path / "skipped", SPIKE, skip_spikes=5.0, save_every=STEPS)
    applied = run(model, same_blocks, tmp_path / "applied", SPIKE)
    assert (never["skipped_steps"], skipped["skipped_steps"], applied["skipped_steps"]) == (0, 1, 0)
    (step, z), = scalars(tmp_path / "skipped", "spikes/loss_z")  # flagged at the step it would have been
    assert step == SPIKE and z > 5.0 and scalars(tmp_path / "skipped", "spikes/grad_norm_z")[0][1] > 5.0
    assert scalars(tmp_path / "never", "spikes/loss_z") == []
    weights = {name: AutoModelForCausalLM.from_pretrained(tmp_path / name).state_dict()
               for name in ("never", "skipped", "applied")}
    assert same_tensors(weights["skipped"], weights["never"])  # bit for bit, AdamW's moments and step count too
    assert same_tensors(optimizer_tensors(tmp_path / "skipped"), optimizer_tensors(tmp_path / "never"))
    assert not same_tensors(weights["applied"], weights["never"])  # the spike, applied, leaves a trace
    assert skipped["eval_loss"] == never["eval_loss"] and skipped["train_steps"] == STEPS
    assert [s for s, _ in scalars(tmp_path / "skipped", "train/lr")] == list(range(2, STEPS + 1, 2))
    assert scalars(tmp_path / "skipped", "train/lr") == scalars(tmp_path / "never", "train/lr")  # the schedule


def test_a_run_with_both_options_resumes_exactly_and_judges_with_the_saved_window(no_dropout_models, same_blocks,
                                                                                    tmp_path):
    # resumed at step 12, the spike at 14 comes 2 steps in: only the window the checkpoint kept can flag it
    model, options = no_dropout_models["clm"], dict(skip_spikes=5.0, log_layers=True, save_every=12)
    whole = run(model, same_blocks, tmp_path / "whole", SPIKE, **options)
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step-12", tmp_path / "resumed" / "checkpoints" / "step-12")
    resumed = run(model, same_blocks, tmp_path / "resumed", SPIKE - 12, resume_from="latest", **options)
    assert whole["skipped_steps"] == resumed["skipped_steps"] == 1
    assert resumed["eval_loss"] == whole["eval_loss"]
    assert same_tensors(AutoModelForCausalLM.from_pretrained(tmp_path / "whole").state_dict(),
                        AutoModelForCausalLM.from_pretrained(tmp_path / "resumed").state_dict())
    after = [(step, v) for step, v in scalars(tmp_path / "whole", "update_ratio/layer.1") if step > 12]
    assert scalars(tmp_path / "resumed", "update_ratio/layer.1") == after and len(after) == 4  # steps 14-20


def test_spikes_without_end_stop_the_run_in_one_line(no_dropout_models, same_blocks, tmp_path):
    class Diverged(TokenLoss):  # from step 12 on the loss is 50 times what it was: no step is like the window
        calls = 0

        def forward(self, input_ids, attention_mask, labels):
            loss = super().forward(input_ids, attention_mask, labels)
            self.calls += self.training
            return loss * 50 if self.calls >= 12 else loss

    cfg = Config.for_task("clm", model=str(no_dropout_models["clm"]), train_file=str(same_blocks), block_size=32,
                          batch_size=2, max_train_steps=STEPS, precision="fp32", compile="off", skip_spikes=5.0,
                          output_dir=str(tmp_path / "out"))
    with pytest.raises(UsageError, match="10 steps in a row were spikes .the last would have been step 12.: the loss "
                                         "or the gradient norm has left the range of the last 100 steps for good"):
        train(cfg, loss=Diverged)


def test_a_spike_ending_an_epoch_leaves_the_checkpoint_at_the_lr_its_last_step_ran_at(no_dropout_models, same_blocks,
                                                                                       tmp_path, capsys):
    # 24 blocks of 2: an epoch is 12 steps; its 12th is a spike, so the epoch ends after 11 applied steps and its
    # checkpoint is step 11. The optimizer keeps step 11's lr: a resumed run sees no changed schedule.
    from lm.checkpoint import load
    from lm.optim import lr_factor

    model = no_dropout_models["clm"]
    assert run(model, same_blocks, tmp_path / "whole", 12, skip_spikes=5.0, save_every=100)["skipped_steps"] == 1
    group = load(tmp_path / "whole" / "checkpoints" / "step-11").optimizer["param_groups"][0]
    assert group["lr"] == pytest.approx(1e-3 * lr_factor(10, STEPS, 0, "linear"), rel=1e-12)
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step-11", tmp_path / "resumed" / "checkpoints" / "step-11")
    capsys.readouterr()
    run(model, same_blocks, tmp_path / "resumed", skip_spikes=5.0, save_every=100, resume_from="latest")
    assert "ran at lr" not in capsys.readouterr().out
