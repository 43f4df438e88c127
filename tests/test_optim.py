import importlib.util
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, get_scheduler

from conftest import NEEDS_MUON, ROOT
from lm.checkpoint import read_state
from lm.config import SCHEDULES, Config
from lm.errors import UsageError
from lm.optim import Combined, build_optimizer, lr_factor, parameter_groups, set_lr
from lm.train import train

spec = importlib.util.spec_from_file_location("lion", ROOT / "examples" / "lion.py")
lion = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lion)  # its optimizer; main() runs only as a script


def test_no_weight_decay_on_biases_and_norm_weights_and_fresh_params_get_their_lr():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    groups = parameter_groups(model, lr=1e-5, weight_decay=0.1, new_params=frozenset({"2.weight", "2.bias"}),
                              new_lr=1e-3)
    by_name = {n: (g["weight_decay"], g["lr"]) for g in groups for n in g["names"]}
    assert by_name == {"0.weight": (0.1, 1e-5), "0.bias": (0.0, 1e-5), "1.weight": (0.0, 1e-5),
                       "1.bias": (0.0, 1e-5), "2.weight": (0.1, 1e-3), "2.bias": (0.0, 1e-3)}
    optimizer = build_optimizer(groups, Config.for_task("clm"))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 6


def small_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2))


@NEEDS_MUON
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = small_gpt2()
    groups = parameter_groups(model, lr=1e-3, weight_decay=0.1)
    optimizer = build_optimizer(groups, Config.for_task("clm", optimizer="muon"))
    assert isinstance(optimizer, Combined)
    muon, adamw = optimizer.optimizers
    assert (type(muon), type(adamw)) == (torch.optim.Muon, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = sorted(names[id(p)] for g in muon.param_groups for p in g["params"])
    # GPT-2's Conv1D weights inside the blocks; not the token and position embeddings (the head is tied to them),
    # nor norms and biases
    assert in_muon == sorted(f"transformer.h.{i}.{m}.weight" for i in (0, 1)
                             for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_adamw == set(names.values()) - set(in_muon)
    assert {g["weight_decay"] for g in muon.param_groups} == {0.1} and muon.param_groups[0]["adjust_lr_fn"] == (
        "match_rms_adamw")
    # one schedule for both: every group's learning rate from its base_lr
    assert set_lr(optimizer, 0.5) == 5e-4 and {g["lr"] for g in optimizer.param_groups} == {5e-4}


@pytest.mark.parametrize("kind, cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_adamw_and_sgd_are_torchs_over_the_same_groups(kind, cls):
    groups = parameter_groups(small_gpt2(), lr=1e-3, weight_decay=0.1)
    optimizer = build_optimizer(groups, Config.for_task("clm", optimizer=kind))
    assert type(optimizer) is cls and len(optimizer.param_groups) == len(groups)
    assert optimizer.param_groups[0].get("momentum", 0.9) == 0.9  # SGD's: lm.optim.SGD_MOMENTUM


@NEEDS_MUON
def test_muon_refuses_a_model_without_hidden_matrices():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    with pytest.raises(UsageError, match="--optimizer muon trains the 2-D weights inside transformer layers"):
        build_optimizer(parameter_groups(model, 1e-3, 0.0), Config.for_task("clm", optimizer="muon"))


def run_settings(model_dir, corpus, out, **extra) -> Config:
    """6 fp32 steps of the tiny GPT-2 without dropout, a checkpoint at step 3."""
    return Config.for_task("clm", model=str(model_dir), train_file=str(corpus), block_size=32, batch_size=2,
                           max_train_steps=6, lr=1e-3, weight_decay=0.1, precision="fp32", compile="off",
                           save_every=3, output_dir=str(out), **extra)


@pytest.mark.parametrize("optimizer", [pytest.param("muon", marks=NEEDS_MUON), "sgd", "lion"])
def test_every_optimizer_resumes_bitwise(optimizer, no_dropout_models, corpus, tmp_path):
    extra, factory = ({}, lion.lion) if optimizer == "lion" else ({"optimizer": optimizer}, None)
    model = no_dropout_models["clm"]
    whole = train(run_settings(model, corpus, tmp_path / "whole", **extra), optimizer=factory)
    assert read_state(tmp_path / "whole" / "checkpoints" / "step-3")["optimizer"] == {
        "muon": "Muon+AdamW", "sgd": "SGD", "lion": "Lion"}[optimizer]
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step-3", tmp_path / "resumed" / "checkpoints" / "step-3")
    resumed = train(run_settings(model, corpus, tmp_path / "resumed", resume_from="latest", **extra),
                    optimizer=factory)
    assert resumed["eval_loss"] == whole["eval_loss"] and whole["perplexity"] < whole["perplexity_before"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "whole").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the optimizer state the resumed run saved at step 6 is the uninterrupted run's, to the bit
    sa, sb = (torch.load(run / "checkpoints" / "step-6" / "optimizer.pt") for run in (tmp_path / "whole",
                                                                                       tmp_path / "resumed"))
    flat = lambda state: [t for saved in state.get("optimizers", [state]) for s in saved["state"].values()
                          for t in s.values() if isinstance(t, torch.Tensor)]
    assert len(flat(sa)) > 0 and all(torch.equal(x, y) for x, y in zip(flat(sa), flat(sb), strict=True))
    if optimizer == "lion":  # its state can't go to another optimizer: refused, not silently reused
        shutil.copytree(tmp_path / "whole" / "checkpoints" / "step-3", tmp_path / "other" / "checkpoints" / "step-3")
        with pytest.raises(UsageError, match="the checkpoint's optimizer is Lion, this run's AdamW"):
            train(run_settings(model, corpus, tmp_path / "other", resume_from="latest"))


def test_a_factory_and_optimizer_are_one_choice(tiny_gpt2, corpus, tmp_path):
    with pytest.raises(UsageError, match="train\\(optimizer=...\\) builds the optimizer: drop --optimizer muon"):
        train(run_settings(tiny_gpt2, corpus, tmp_path, optimizer="muon"), optimizer=lion.lion)


@pytest.mark.parametrize("warmup", [0, 5])
@pytest.mark.parametrize("kind", SCHEDULES)
def test_every_schedule_is_transformers_schedule_of_that_name(kind, warmup):
    lr = 3e-4  # polynomial decays to an absolute 1e-7, so its factor depends on the peak
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=30)
    for step in range(33):
        assert lr * lr_factor(step, 30, warmup, kind, lr) == pytest.approx(scheduler.get_last_lr()[0], rel=1e-12,
                                                                        abs=1e-15), step
        optimizer.step()
        scheduler.step()


def test_constant_has_no_warmup_and_constant_with_warmup_has():
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [1.0, 1.0, 1.0, 1.0]
    assert [lr_factor(s, 10, 2, "constant_with_warmup") for s in (0, 1, 2, 9)] == [0.0, 0.5, 1.0, 1.0]


def test_train_lr_is_the_schedule_of_lr_when_a_fresh_heads_group_comes_first(model_dirs, corpus, tmp_path):
    """Under LoRA on a checkpoint without its MLM head, the first parameter group is the fresh head's biases and
    norms (at --head-lr): TensorBoard's train/lr is still --lr's schedule."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from conftest import scalars

    headless = tmp_path / "headless"
    AutoModelForMaskedLM.from_pretrained(model_dirs["mlm"]).bert.save_pretrained(headless)
    AutoTokenizer.from_pretrained(model_dirs["mlm"]).save_pretrained(headless)
    out = tmp_path / "run"
    train(Config.for_task("mlm", model=str(headless), train_file=str(corpus), block_size=16, batch_size=4,
                          max_train_steps=4, warmup_steps=2, lora_rank=4, lr=1e-3, head_lr=1e-2, precision="fp32",
                          compile="off", log_every=1, output_dir=str(out)))
    assert [v for _, v in scalars(out, "train/lr")] == pytest.approx(
        [1e-3 * lr_factor(step, 4, 2, "linear") for step in range(4)], rel=1e-6)
