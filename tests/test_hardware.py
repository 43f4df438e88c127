import dataclasses
import json
import os
import subprocess
import sys
import time
import types

import pytest
import torch

from torch.utils.flop_counter import FlopCounterMode

from conftest import metrics, scalars, tiny_model
from lm import hardware
from lm.config import Config
from lm.errors import UsageError
from lm.data import IGNORE, causal_labels
from lm.compiling import (COMPILE_GAIN, COMPILE_SECONDS, COMPILE_STALE_AFTER, COMPILE_WARM_SHARE, compile_estimate,
                          compile_key, compile_pays, record_compile)
from lm.hardware import (PEAK_CACHE, FlopCounts, Peak, autocast, choose_precision, flop_counts, gpu_peak_flops,
                         measure_peak_flops, native_bf16, probe_key, probe_shapes, resolve_device, resolve_peak,
                         step_flops)
from lm.losses import SPLIT_HEAD, TokenLoss


@pytest.mark.parametrize("device, native, expected", [
    ("cuda", True, "bf16"), ("cuda", False, "fp32"), ("cpu", True, "bf16"), ("cpu", False, "fp32"),
    ("mps", False, "fp32"),
])
def test_auto_picks_bf16_only_where_the_hardware_has_it(device, native, expected):
    assert choose_precision("auto", device, native)[0] == expected


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_gives_a_gpu_bf16_only_from_ampere_on(capability, expected, monkeypatch):
    # A V100 (7.0) or T4 (7.5) runs bf16 only emulated, which torch.cuda.is_bf16_supported() counts by default
    props = types.SimpleNamespace(major=capability[0], minor=capability[1], name="a GPU")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True, raising=False)  # emulation
    assert choose_precision("auto", "cuda", native_bf16(torch.device("cuda", 0)))[0] == expected


def test_explicit_precision_is_kept_and_fp16_needs_cuda():
    assert choose_precision("bf16", "cpu", False) == ("bf16", "requested")
    assert choose_precision("fp16", "cuda", True)[0] == "fp16"
    with pytest.raises(UsageError, match="fp16 needs a CUDA GPU"):
        choose_precision("fp16", "cpu", True)


def test_autocast_runs_matmuls_in_bf16_and_fp32_is_untouched():
    a = torch.randn(4, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert (a @ a).dtype == torch.float32


def test_auto_device_is_cpu_here_and_a_missing_device_is_an_error():
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(UsageError, match="no such device"):
            resolve_device("cuda")


@pytest.mark.parametrize("name, precision, tflops", [
    ("Tesla V100-SXM2-16GB", "fp32", 15.7),  # no TF32: plain fp32, not half the fp16 tensor-core rate
    ("Tesla V100-SXM2-16GB", "fp16", 125), ("Tesla V100-PCIE-32GB", "fp32", 14),
    ("Tesla V100-SXM2-16GB", "bf16", None),  # no bf16 units: measured
    ("Tesla T4", "fp32", 8.1), ("Tesla T4", "fp16", 65), ("Tesla T4", "bf16", None),
    ("NVIDIA L40", "bf16", 181), ("NVIDIA L4", "bf16", 121), ("NVIDIA L40S", "bf16", 362),  # L40 is not L4
    ("NVIDIA A100-SXM4-80GB", "fp32", 156), ("NVIDIA A10", "bf16", 125), ("NVIDIA A10G", "bf16", None),
    ("NVIDIA H100 80GB HBM3", "bf16", 989), ("NVIDIA H100 PCIe", "fp32", 378),
    # fp32-accumulate rates (PyTorch's), as NVIDIA's Ada and Ampere whitepapers give them
    ("NVIDIA GeForce RTX 4090", "bf16", 165), ("NVIDIA GeForce RTX 3090", "bf16", 71),
    ("NVIDIA GeForce RTX 3090 Ti", "bf16", 80),
])
def test_the_gpu_table_gives_each_card_its_own_peak(name, precision, tflops):
    assert gpu_peak_flops(name, precision) == (tflops * 1e12 if tflops else None)


# ---------------------------------------------------------------- the measured peak

SMALL = ((256, 64, 256), (256, 64, 1024))  # (m, k, n): quick even where bf16 is emulated


def test_the_probe_measures_a_plausible_peak_quickly_and_caches_it_per_precision(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "BUSY", 0.0)  # kept however busy the machine running the tests is
    cpu = torch.device("cpu")
    started = time.perf_counter()
    flops, share = measure_peak_flops(cpu, "fp32", SMALL, tmp_path)
    assert time.perf_counter() - started < 10
    assert 1e8 < flops < 1e14 and 0 < share <= 1.05  # from an old laptop core to a many-core server
    cache = tmp_path / PEAK_CACHE
    (key, entry), = json.loads(cache.read_text()).items()
    assert entry["flops"] == flops and "fp32" in key
    cache.write_text(json.dumps({key: {**entry, "flops": 123.0}}))
    assert measure_peak_flops(cpu, "fp32", SMALL, tmp_path) == (123.0, None)  # read back, not measured again
    assert measure_peak_flops(cpu, "bf16", SMALL, tmp_path)[0] > 1e6  # a separate entry, measured
    assert len(json.loads(cache.read_text())) == 2
    assert measure_peak_flops(cpu, "fp32", SMALL[:1], tmp_path)[0] != 123.0  # other shapes: measured again


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pins a process to a core: Linux")
def test_a_peak_probed_while_other_processes_hold_the_cpu_is_not_cached_and_says_so(tmp_path):
    """A one-thread probe pinned to the core a spinning process is pinned to gets about half its time, however many
    cores the machine has: cached, a peak probed so would make every later run's MFU read high."""
    cpu, core, affinity, threads = torch.device("cpu"), min(os.sched_getaffinity(0)), os.sched_getaffinity(0), \
        torch.get_num_threads()
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                           preexec_fn=lambda: os.sched_setaffinity(0, {core}))
    try:
        torch.set_num_threads(1)  # the matmuls run on this thread, pinned beside the spinner
        os.sched_setaffinity(0, {core})
        time.sleep(0.5)
        peak = resolve_peak("auto", cpu, "fp32", SMALL, tmp_path)
    finally:
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)
        hog.kill()
        hog.wait()
    assert "other work held the CPU" in peak.source and "not cached" in peak.source, peak.source
    assert peak.flops > 0 and not (tmp_path / PEAK_CACHE).exists()


def test_the_probe_key_names_the_thread_count_training_will_use():
    threads = torch.get_num_threads()
    try:
        keys = set()
        for n in (1, 2):
            torch.set_num_threads(n)
            keys.add(probe_key(torch.device("cpu"), "fp32", SMALL))
    finally:
        torch.set_num_threads(threads)
    assert len(keys) == 2


def test_a_given_peak_is_used_as_is_and_auto_measures_on_a_cpu(tmp_path):
    cpu = torch.device("cpu")
    assert resolve_peak(2.5e12, cpu, "fp32", SMALL, tmp_path).flops == 2.5e12
    assert not (tmp_path / PEAK_CACHE).exists()
    (tmp_path / PEAK_CACHE).write_text(json.dumps({probe_key(cpu, "fp32", SMALL): {"flops": 7e9}}))
    assert resolve_peak("auto", cpu, "fp32", SMALL, tmp_path).flops == 7e9


def test_a_given_peak_that_a_run_beats_is_raised_to_the_run_s_rate_with_a_line():
    said = []
    peak = Peak(1e9, "--peak-flops")
    assert peak.utilization(5e8, said.append) == 0.5 and said == []
    assert peak.utilization(4e9, said.append) == 1.0 and peak.flops == 4e9  # never above 100%
    assert said == ["MFU: this run computed 4.0 GFLOP/s per device, above the peak of 1.0 (--peak-flops): "
                    "the peak is now 4.0 GFLOP/s"]


def test_a_cached_peak_a_run_beats_is_measured_again_and_mfu_stays_at_most_100_percent(tiny_gpt2, corpus, tmp_path,
                                                                                       capsys):
    # A peak probed while other work held the machine was cached at 31.9 GFLOP/s on a CPU that does 193.6
    # in fp32, and runs then printed MFU 438-794%. Here the cache says 1 MFLOP/s, below any CPU.
    from transformers import AutoConfig

    from lm.train import train

    cfg = Config.for_task("clm", model=tiny_gpt2, train_file=str(corpus), block_size=32, max_train_steps=4,
                          log_every=1, precision="fp32", compile="off", output_dir=str(tmp_path / "run"),
                          cache_dir=str(tmp_path / "cache"))
    key = probe_key(torch.device("cpu"), "fp32", probe_shapes(AutoConfig.from_pretrained(tiny_gpt2),
                                                                  cfg.batch_size * cfg.block_size))
    cache = tmp_path / "cache" / PEAK_CACHE
    cache.parent.mkdir()
    cache.write_text(json.dumps({key: {"flops": 1e6}}))
    m = train(cfg)
    out = capsys.readouterr().out
    assert "MFU against a peak of 0.0 GFLOP/s per device" in out  # the seeded entry was read
    mfu = [value for _, value in scalars(tmp_path / "run", "train/mfu")]
    assert len(mfu) == 4 and all(0 < value <= 1 for value in mfu), mfu
    assert 0 < m["mfu"] <= 1 and metrics(tmp_path / "run")["mfu"] == m["mfu"]
    assert f"(MFU {m['mfu']:.1%})" in out.splitlines()[-1]
    assert out.count("measured again") == 1, out  # once, in one line
    (entry_key, entry), = json.loads(cache.read_text()).items()
    assert entry_key == key and entry["flops"] > 1e8  # a real probe's rate, kept for the next run
    # the probe between steps leaves training alone: a run that finds the corrected peak trains the same weights
    from safetensors.torch import load_file

    again = train(dataclasses.replace(cfg, output_dir=str(tmp_path / "again")))
    assert "measured again" not in capsys.readouterr().out and 0 < again["mfu"] <= 1
    first, second = (load_file(tmp_path / run / "model.safetensors") for run in ("run", "again"))
    assert [name for name in first if not torch.equal(first[name], second[name])] == []


# ---------------------------------------------------------------- the FLOPs of a step

def test_gpt2_counts_its_tied_head_once_where_it_does_work(tokenizer):
    from transformers import GPT2LMHeadModel

    tied = tiny_model("clm", tokenizer)
    untied = GPT2LMHeadModel(tied.config.__class__(**{**tied.config.to_dict(), "tie_word_embeddings": False}))
    assert tied.lm_head.weight is tied.transformer.wte.weight and untied.lm_head.weight is not untied.transformer.wte.weight
    H, L, V = 32, 2, len(tokenizer)
    # a block: 2 layer norms, qkv, attention out, MLP in and out (4H wide) with biases; then the final norm.
    # Not counted: the token and position tables, which are looked up, not multiplied.
    expected = FlopCounts(body=L * (12 * H * H + 13 * H) + 2 * H, head=V * H, layers=L, width=H)
    assert flop_counts(tied) == flop_counts(untied) == expected


def test_bert_mlm_head_flops_count_only_the_labelled_positions(tokenizer):
    H, L, I, V, T = 32, 2, 64, len(tokenizer), 64
    counts = flop_counts(tiny_model("mlm", tokenizer))
    # body: the embeddings' layer norm; per layer q, k, v, out (H x H + bias), 2 layer norms, H -> I -> H with biases
    body = 2 * H + L * (4 * (H * H + H) + 4 * H + (H * I + I) + (I * H + H))
    # head (`cls`): dense H x H + bias, layer norm, decoder V x H (tied to the word table) + its bias
    head = (H * H + H) + 2 * H + V * H + V
    assert counts == FlopCounts(body, head, L, H)
    assert step_flops(*counts, seq_len=T, input_tokens=T, predicted_tokens=10) == (
        6 * body * T + 6 * head * 10 + 12 * L * H * T * T)


def opt_without_split_head(tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=64))


def test_a_head_that_runs_on_every_position_counts_with_the_body(tokenizer):
    model = opt_without_split_head(tokenizer)
    assert model.config.model_type not in SPLIT_HEAD
    counts = flop_counts(model)
    assert counts.head == 0 and counts.body > len(tokenizer) * 32  # the tied head's V x H is in the body


def addmm_inplace(self_shape, a_shape, b_shape, **_):  # FlopCounterMode counts addmm, not addmm_ (our fused head)
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


@pytest.mark.parametrize("task", ["clm", "mlm", "no split head"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_step_flops_agree_with_the_matmuls_torch_counts_in_a_real_step(tokenizer, task, precision):
    model = opt_without_split_head(tokenizer) if task == "no split head" else tiny_model(task, tokenizer)
    model.set_attn_implementation("eager")  # attention as bmm, which the counter sees (CPU SDPA it doesn't)
    input_ids = torch.randint(5, 1000, (2, 64))
    mask = torch.ones_like(input_ids)
    if task == "mlm":
        labels = torch.full_like(input_ids, IGNORE)
        labels[0, :10] = input_ids[0, :10]
    else:
        labels = causal_labels(input_ids, mask)
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_inplace}) as counter:
        with autocast(torch.device("cpu"), precision):
            loss = TokenLoss(model)(input_ids, mask, labels)
        loss.backward()
    ours = step_flops(*flop_counts(model), seq_len=64, input_tokens=mask.sum().item(),
                      predicted_tokens=(labels != IGNORE).sum().item())
    # ours also counts biases and norm weights as 6 FLOPs per token (the 6N convention); torch counts
    # matmuls only. BERT's decoder bias (V of them) is the largest such term: 3% of this tiny model.
    assert ours == pytest.approx(counter.get_total_flops(), rel=0.04)
    assert ours >= counter.get_total_flops()


# ---------------------------------------------------------------- --compile auto

def test_compile_auto_compiles_when_the_time_saved_pays_for_compiling(tokenizer, tmp_path):
    # 0.05 s steps, 80% of each saved: 20 s over 500 steps against 10 s of compiling
    assert compile_pays(500, 0.05, 10.0, 0.8) == (True, "on: ~20 s saved over 500 steps (80% of each) against ~10 s "
                                                        "of compiling")
    assert compile_pays(100, 0.05, 10.0, 0.8)[0] is False  # 4 s saved: not worth 10 s
    assert compile_pays(10**6, 10.0, 1.0, -0.3) == (False, "off: compiling was measured not to make these steps "
                                                           "faster here")


def test_compile_auto_with_no_estimate_compiles_to_measure_where_the_run_leaves_room():
    # no gain known (CUDA fp32, a CPU in fp32): compiled where the steps left take 10x the compile, to be measured
    assert compile_pays(500, 0.5, 25.0, None) == (True, "on, to measure what it saves here: ~25 s of compiling "
                                                        "against ~250 s of 500 steps left")
    assert compile_pays(400, 0.5, 25.0, None) == (False, "off: what it saves is not known here, and ~200 s of 400 "
                                                         "steps left are too few to measure it against ~25 s of "
                                                         "compiling")
    assert compile_pays(5, 100.0, 1.0, None)[0] is False  # 6 compiled steps are needed to measure it


def test_a_gain_measured_here_wins_over_the_table_once_it_repeats_and_until_it_is_stale(tokenizer, tmp_path):
    key = compile_key(torch.device("cpu"), "bf16", tiny_model("clm", tokenizer).config, Config.for_task("clm"), 128)
    kind = "cpu-avx512_bf16"
    assert compile_estimate(tmp_path, key, kind, "bf16") == (
        COMPILE_SECONDS["cpu"], COMPILE_GAIN[(kind, "bf16")], f"the estimate for {kind} in bf16; not measured here yet")
    # fp32 on a CPU: no estimate (a long run compiles to measure it)
    assert compile_estimate(tmp_path, key, "cpu", "fp32") == (COMPILE_SECONDS["cpu"], None,
                                                              "no estimate for cpu in fp32; not measured here yet")
    record_compile(tmp_path, key, 80.0, -0.25)  # the first compile: Inductor's cache was cold, it is warm now
    # one measurement of a loss may be noise: the table still decides, so a later run compiles and measures again
    assert compile_estimate(tmp_path, key, kind, "bf16") == (
        80.0 * COMPILE_WARM_SHARE, COMPILE_GAIN[(kind, "bf16")], f"the estimate for {kind} in bf16; measured here once")
    record_compile(tmp_path, key, 11.0, None)  # --compile on: no eager steps to compare with, the gain stays
    record_compile(tmp_path, key, 70.0, -0.15)  # cold again after a change of code: the cache is warm after it
    seconds, gain, source = compile_estimate(tmp_path, key, kind, "bf16")
    assert (seconds, source) == (11.0, "measured here 2 times") and gain == pytest.approx(-0.2)
    for _ in range(COMPILE_STALE_AFTER):  # decisions made on it ...
        assert compile_estimate(tmp_path, key, kind, "bf16", decide=True)[1] == pytest.approx(-0.2)
    # ... until it is stale: the table again, so that a run measures anew
    assert compile_estimate(tmp_path, key, kind, "bf16")[1:] == (
        COMPILE_GAIN[(kind, "bf16")], f"the estimate for {kind} in bf16; measured {COMPILE_STALE_AFTER} runs ago")
