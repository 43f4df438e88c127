"""The memory plan: its terms against what the model really holds and trains, its refusal before anything is
loaded, and the peak a run measures in metrics.json and TensorBoard."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, LlamaConfig

from conftest import ENV, NEEDS_MUON, ROOT, metrics, run_script, scalars
from lm import adapters, memory
from lm.config import Config
from lm.errors import UsageError
from lm.modeling import load_config, meta_model
from lm.objectives import CLM
from lm.optim import build_optimizer, optimizers, parameter_groups
from lm.train import setup

CPU = torch.device("cpu")


def planner(path, task: str, precision: str = "fp32", make_optimizer=None, **settings
            ) -> tuple[memory.Planner, Config]:
    cfg = Config.for_task(task, **settings)
    model_class = "AutoModelForCausalLM" if task == "clm" else "AutoModelForMaskedLM"
    return memory.planner(load_config(str(path), {}), model_class, str(path), cfg, precision, CPU, None,
                          make_optimizer=make_optimizer), cfg


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_weights_and_gradients_are_the_parameters_bytes(model_dirs, task):
    planned, cfg = planner(model_dirs[task], task, batch_size=2, block_size=16)
    plan = planned.plan(cfg, 16)
    auto = AutoModelForCausalLM if task == "clm" else AutoModelForMaskedLM
    n = sum(p.numel() for p in auto.from_pretrained(model_dirs[task]).parameters())  # tied weights once
    assert (plan.parameters, plan.trainable) == (n, n)
    assert (plan.weights, plan.gradients) == (4 * n, 4 * n)
    assert plan.activations > 0 and plan.head > 0 and plan.baseline > 0
    # the line's terms add up to its total
    terms = re.fullmatch(r"memory: ~([\d.]+) GiB planned \((.*)\) of [\d.]+ GiB available", plan.line())
    parts = [float(term.split()[1]) for term in terms[2].split(", ")]
    assert sum(parts) == pytest.approx(float(terms[1]), abs=0.005 * len(parts))


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_lora_trains_what_the_plan_counts_and_keeps_the_frozen_base_in_bf16(model_dirs, task):
    planned, cfg = planner(model_dirs[task], task, "bf16", lora_rank=4, batch_size=2, block_size=16)
    plan = planned.plan(cfg, 16)
    auto = AutoModelForCausalLM if task == "clm" else AutoModelForMaskedLM
    model = auto.from_pretrained(model_dirs[task], dtype=torch.bfloat16)  # as lm.train.build_model loads it
    wrapped, _ = adapters.add_adapters(model, cfg, frozenset())
    params = {id(p): p for p in wrapped.get_base_model().parameters()}.values()
    trained = sum(p.numel() for p in params if p.requires_grad)
    assert 0 < plan.trainable == trained < plan.parameters == sum(p.numel() for p in params)
    assert plan.weights == 2 * (plan.parameters - trained) + 4 * trained
    assert plan.gradients == 4 * trained


def lion():
    """examples/lion.py's optimizer factory: an optimizer from outside lm (one momentum per parameter)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lion_example", ROOT / "examples" / "lion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.lion


def state_bytes(optimizer) -> int:
    """What a real optimizer holds: the storages of its state's tensors, each once."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for o in optimizers(optimizer)
                for state in o.state.values() for t in state.values() if torch.is_tensor(t)}.values())


@pytest.mark.parametrize("optimizer, lora_rank", [
    ("adamw", 0), ("sgd", 0), pytest.param("muon", 0, marks=NEEDS_MUON), pytest.param("muon", 4, marks=NEEDS_MUON),
    ("lion", 0)])
def test_the_optimizer_term_is_what_the_real_optimizer_holds_after_a_step(model_dirs, optimizer, lora_rank):
    # AdamW keeps two moments (and a step count) per parameter, SGD one momentum, Muon one on the hidden matrices
    # beside AdamW's two on the rest, an optimizer given to train() whatever it keeps
    factory = lion() if optimizer == "lion" else None
    settings = dict(lora_rank=lora_rank, batch_size=2, block_size=16) | ({} if factory else {"optimizer": optimizer})
    planned, cfg = planner(model_dirs["clm"], "clm", make_optimizer=factory, **settings)
    plan = planned.plan(cfg, 16)
    model = AutoModelForCausalLM.from_pretrained(model_dirs["clm"])
    if lora_rank:
        model = adapters.add_adapters(model, cfg, frozenset())[0].get_base_model()
    real = (factory or build_optimizer)(parameter_groups(model, cfg.lr, cfg.weight_decay), cfg)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    real.step()
    trained = sum(p.nbytes for p in model.parameters() if p.requires_grad)
    assert plan.optimizer == state_bytes(real) > 0
    assert plan.optimizer < (1.2 if optimizer in ("sgd", "lion") else 2.1) * trained


def test_an_adapter_directory_is_planned_with_its_own_layers(tiny_gpt2, corpus, tmp_path):
    # an adapter of the attention's c_attn alone: the run trains those, not every linear layer of the body
    adapter = tmp_path / "adapter"
    settings = Config.for_task("clm", lora_rank=4, lora_targets="c_attn", lora_dropout=0.1)
    wrapped, _ = adapters.add_adapters(AutoModelForCausalLM.from_pretrained(tiny_gpt2), settings, frozenset())
    wrapped.peft_config["default"].base_model_name_or_path = tiny_gpt2
    wrapped.save_pretrained(adapter)
    cfg = Config.for_task("clm", model=str(adapter), train_file=str(corpus), block_size=16, batch_size=2,
                          precision="fp32", output_dir=str(tmp_path / "out")).validated()
    run, _ = setup(cfg, CLM, None, None, build_optimizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    loaded, _ = adapters.load_adapters(base, adapter, frozenset())  # as the run loads it
    trained = [p for p in loaded.parameters() if p.requires_grad]
    assert len(trained) == 4  # (two layers' c_attn, A and B)
    assert (run.plan.trainable, run.plan.gradients) == (sum(p.numel() for p in trained), sum(p.nbytes for p in trained))


def test_fresh_parameters_are_read_from_the_checkpoint_header(tiny_bert, tmp_path):
    # a checkpoint of the body alone (as the embedded MiniLM's): the MLM head is what loading initialises afresh
    from lm.modeling import load_model

    AutoModelForMaskedLM.from_pretrained(tiny_bert).bert.save_pretrained(tmp_path)
    config = load_config(tiny_bert, {})
    expected = load_model(str(tmp_path), {}, "AutoModelForMaskedLM")[1]
    model = meta_model(config, "AutoModelForMaskedLM")
    assert expected and memory.fresh_parameters(model, memory.checkpoint_keys(tmp_path)) == expected
    assert memory.fresh_parameters(model, memory.checkpoint_keys(tiny_bert)) == frozenset()


def test_checkpointing_keeps_each_layer_input_and_one_layer(model_dirs):
    planned, cfg = planner(model_dirs["clm"], "clm", batch_size=4, block_size=32)
    full = planned.plan(cfg, 32)
    [kept] = planned.counted.values()
    assert len(kept.layers) == 2 and all(kept.layers) and len(set(kept.layer_inputs)) == 1
    assert kept.layer_inputs[0] == 4 * 32 * 32 * 4  # (B, T, H) fp32 hidden states
    checkpointed = planned.plan(Config.for_task("clm", batch_size=4, block_size=32, gradient_checkpointing=True), 32)
    assert checkpointed.activations == kept.outside + 2 * kept.layer_inputs[0] + max(kept.layers)
    assert checkpointed.activations < full.activations


def test_activations_scale_with_the_batch_and_match_what_a_real_forward_keeps(model_dirs):
    """The fake forward counts what autograd keeps of a real one: the same model and batch, counted on real
    tensors by the same kind of hook."""
    from lm.losses import TokenLoss

    planned, cfg = planner(model_dirs["clm"], "clm", "bf16", batch_size=4, block_size=32)
    small, *larger = (planned.plan(Config.for_task("clm", batch_size=b, block_size=32), 32) for b in (4, 8, 12))
    # linear in the batch, above what a step keeps whatever the batch (autocast's bf16 copies of the weights)
    assert larger[1].activations - larger[0].activations == larger[0].activations - small.activations > 0

    model = AutoModelForCausalLM.from_pretrained(model_dirs["clm"]).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (4, 32))
    labels = torch.cat([ids[:, 1:], torch.full((4, 1), -100)], 1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        module = TokenLoss(model)
        module.texts = False
        loss = module(ids, torch.ones_like(ids), labels)
    real = sum(kept.values()) + sum(b.untyped_storage().nbytes() for b in module.workspace.buffers.values())
    assert small.activations + small.head == pytest.approx(real, rel=0.05)
    del loss


def too_big_for_this_machine(path, tokenizer, vocab: int = 1000) -> None:
    """A Llama config.json (no weights) that full fine-tuning can't fit here and LoRA can: 8 layers, as wide as it
    takes for 16 bytes per parameter (fp32 weights, gradients, AdamW) to be twice the memory free now: the 4
    bytes of the frozen fp32 weights under LoRA are half of it."""
    width = 64 * math.ceil(math.sqrt(2 * memory.free_memory() / 16 / (8 * 16)) / 64)
    LlamaConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=8, num_attention_heads=width // 64,
                num_key_value_heads=width // 64, vocab_size=vocab, tie_word_embeddings=True,
                max_position_embeddings=2048).save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_a_run_that_cannot_fit_is_refused_in_one_line_before_anything_is_loaded(tokenizer, corpus, tmp_path):
    model, cache, out = tmp_path / "big", tmp_path / "cache", tmp_path / "out"
    too_big_for_this_machine(model, tokenizer)
    started = time.perf_counter()
    r = run_script("clm", "--model", model, "--train-file", corpus, "--cache-dir", cache, "--output-dir", out,
                   "--precision", "fp32", "--batch-size", "1", timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.startswith("error: memory: ~") and r.stderr.count("\n") == 1, r.stderr
    assert "planned (weights" in r.stderr and "GiB available: the run would not fit" in r.stderr
    assert "--lora-rank 16 (~" in r.stderr and "--ignore-memory-plan" in r.stderr
    assert time.perf_counter() - started < 60
    # nothing loaded, tokenized or written: there are no weights to load, and the caches and the run stay empty
    assert not (cache / "tokens").exists() and not out.exists()


def test_a_model_from_scratch_that_cannot_fit_is_not_offered_lora(tokenizer, corpus, tmp_path):
    # LoRA adapts a trained model: offered to a model from scratch, it would be refused in turn
    config = tmp_path / "big"
    too_big_for_this_machine(config, tokenizer)
    r = run_script("clm", "--config-name", config, "--train-file", corpus, "--cache-dir", tmp_path / "cache",
                   "--output-dir", tmp_path / "out", "--precision", "fp32", "--batch-size", "1", timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: memory: ~") and r.stderr.count("\n") == 1, r.stderr
    assert "the run would not fit. It would not with --gradient-checkpointing either; --ignore-memory-plan" in r.stderr
    assert "lora" not in r.stderr.lower()


def test_a_configuration_from_scratch_whose_forward_fails_is_a_usage_error_naming_it(tmp_path):
    # 4 query heads over 3 key/value heads: attention's shapes don't match (a check of lm.modeling.scratch_config
    # refuses this one earlier; any other such failure of the counting forward ends here)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=3, vocab_size=100)
    cfg = Config.for_task("clm", model_type="llama", config_overrides="num_key_value_heads=3", tokenizer="t",
                          batch_size=2, block_size=16)
    message = (r"^--model-type llama --config-overrides num_key_value_heads=3: the model this configuration "
               r"describes can't run \(RuntimeError: The size of tensor a")
    with pytest.raises(UsageError, match=message) as e:
        memory.plan_run(cfg, config, "AutoModelForCausalLM", None, "fp32", CPU, 1, tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("forward, cannot_run", [
    (lambda x: bool(x.sum() > 0), False),  # reads a value: fake tensors have none, a real run would go on
    (lambda x: x[x > 0], False),  # a size that depends on values
    (lambda x: x.numpy(), False),
    (lambda x: x.view(4, 3) @ x.view(4, 3), True),  # the model's own error: shapes that don't match
])
def test_only_the_models_own_errors_are_configuration_errors_not_what_fake_tensors_cannot_run(forward, cannot_run):
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    with mode:
        x = torch.zeros(3, 4)
    with pytest.raises(Exception) as e, memory.model_errors(), mode:
        forward(x)
    assert isinstance(e.value, memory.CannotRun) == cannot_run, e.value


def test_ignore_memory_plan_goes_past_the_plan(tokenizer, corpus, tmp_path):
    model = tmp_path / "big"
    too_big_for_this_machine(model, tokenizer)
    r = run_script("clm", "--model", model, "--train-file", corpus, "--cache-dir", tmp_path / "cache",
                   "--output-dir", tmp_path / "out", "--precision", "fp32", "--ignore-memory-plan", timeout=120)
    assert "GiB available: it would not fit; started anyway (--ignore-memory-plan)" in r.stdout, r.stdout + r.stderr
    # then loading the tokenizer finds it too large for the model's 1,000 embeddings: well past the plan
    assert r.returncode == 2 and "the model" in r.stderr and "embeds 1,000" in r.stderr, r.stderr


def test_the_peak_is_in_metrics_and_tensorboard_beside_the_plan(tiny_gpt2, corpus, tmp_path):
    out = tmp_path / "run"
    r = run_script("clm", "--model", tiny_gpt2, "--train-file", corpus, "--block-size", "16", "--max-train-steps", "2",
                   "--log-every", "1", "--output-dir", out, "--precision", "fp32")
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(line for line in r.stdout.splitlines() if line.startswith("memory: ~"))
    m = metrics(out)
    assert f"~{m['planned_memory_gib']:.2f} GiB planned" in line
    # the peak RSS of a process that imported torch and transformers; a plan counts that process before
    # anything is loaded, and more
    logged = scalars(out, "train/peak_memory_gib")
    assert [s for s, _ in logged] == [1, 2]
    assert 0.2 < logged[0][1] <= logged[1][1] <= m["peak_memory_gib"] < m["planned_memory_gib"]


def test_the_peak_never_reads_lower_than_it_did():
    # Linux's VmHWM comes from memory counters synced lazily: after freed pages it read 47 KiB below an earlier
    # reading here, and a run's final peak came out below the one logged at its last step
    import mmap
    readings = []
    for _ in range(3):
        pages = mmap.mmap(-1, 64 * 2 ** 20)
        for offset in range(0, len(pages), 4096):
            pages[offset] = 1
        readings.append(memory.peak_rss())
        pages.madvise(mmap.MADV_DONTNEED)
        readings.append(memory.peak_rss())
        pages.close()
    assert readings == sorted(readings)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux's /proc")
def test_a_run_started_from_a_big_process_measures_its_own_peak():
    # Linux's ru_maxrss carries the parent's peak across fork and exec: a run launched by a 1 GiB test runner or
    # notebook would report 1 GiB, above any plan of a small model
    held = torch.ones(2 ** 28)  # 1 GiB resident in this process
    child = subprocess.run([sys.executable, "-c", "from lm.memory import peak_rss; print(peak_rss())"], cwd=ROOT,
                           env=ENV, capture_output=True, text=True, check=True)
    assert int(child.stdout) < 0.6 * held.numel() * held.element_size()
