"""Which device and which numerics a run uses, decided by pure functions the tests can call; and MFU's
two halves: what the device can compute (a GPU table or a measured peak) and what a step computes.
What is measured per machine (the peak, the faster attention) is kept in CACHE_DIR, read back by key."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lm.cache import measured, recalled, remember
from lm.errors import UsageError
from lm.losses import split_head


def resolve_device(requested: str) -> torch.device:
    """auto: CUDA, then Apple MPS, then CPU. An explicit device that isn't there is an error."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if requested == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if not available[requested]:
        raise UsageError(f"--device {requested}: no such device here; use --device auto or cpu")
    return torch.device(requested)


def native_bf16(device: torch.device) -> bool:
    """Whether this device runs bf16 matmuls natively (Ampere+ GPUs; CPUs with AMX or AVX512-BF16)."""
    if device.type == "cuda":
        # Ampere (compute capability 8) and newer, or ROCm. Not torch.cuda.is_bf16_supported(): it also
        # counts emulation, which runs bf16 on a V100 or T4 several times slower than fp32.
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return False  # MPS: kept on fp32, the path we can't measure


def choose_precision(requested: str, device_type: str, bf16_native: bool) -> tuple[str, str]:
    """(precision, reason). auto picks bf16 autocast where the hardware has it, else fp32."""
    if requested == "fp16" and device_type != "cuda":
        raise UsageError(f"--precision fp16 needs a CUDA GPU (this run is on {device_type}); "
                         "use --precision bf16 or fp32")
    if requested != "auto":
        return requested, "requested"
    if bf16_native:
        why = "GPU supports bf16" if device_type == "cuda" else "CPU has AMX/AVX512-BF16"
        return "bf16", f"auto: {why}"
    return "fp32", f"auto: no native bf16 on {device_type}"


def autocast(device: torch.device, precision: str):
    """Mixed-precision context for forward passes; weights and optimizer state stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def configure(device: torch.device) -> None:
    """Process-wide speed settings: TF32 matmuls on Ampere and newer GPUs."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# Dense peaks of one GPU in TFLOP/s, as PyTorch runs each precision: bf16 and fp16 with fp32
# accumulation, and fp32 as TF32 where the card has it (configure() allows it), else plain fp32.
# None: the card has no bf16 units (it would be emulated), so the probe measures what it gets.
# Names match as whole words, the first row that matches wins: "L4" is not "L40", "A10" not "A100" or "A10G".
GPU_PEAKS = [  # (name, bf16, fp16, fp32)
    ("H200", 989, 989, 494), ("H100 PCIe", 756, 756, 378), ("H100 NVL", 835, 835, 418), ("H100", 989, 989, 494),
    ("A100", 312, 312, 156), ("L40S", 362, 362, 183), ("L40", 181, 181, 90.5), ("L4", 121, 121, 60),
    ("A10", 125, 125, 62.5), ("RTX 4090", 165, 165, 82.6), ("RTX 3090 Ti", 80, 80, 40), ("RTX 3090", 71, 71, 35.6),
    ("V100-PCIE", None, 112, 14), ("V100", None, 125, 15.7), ("T4", None, 65, 8.1),
]
_PRECISIONS = ("bf16", "fp16", "fp32")


def table_peak_flops(device: torch.device, precision: str) -> float | None:
    """FLOP/s of a known GPU at this precision (the table above); None elsewhere."""
    if device.type != "cuda":
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(device), precision)


def gpu_peak_flops(name: str, precision: str) -> float | None:
    """FLOP/s of the GPU called `name` at `precision` from GPU_PEAKS, or None when the table doesn't know it."""
    row = next((row for row in GPU_PEAKS if re.search(rf"(?<![A-Za-z0-9]){re.escape(row[0])}(?![A-Za-z0-9])", name)), None)
    tflops = row[1 + _PRECISIONS.index(precision)] if row else None
    return tflops * 1e12 if tflops is not None else None


def resolve_peak(requested: float | str, device: torch.device, precision: str,
                 shapes: tuple[tuple[int, int, int], ...], cache_dir: Path | str | None) -> Peak:
    """The peak of one device for MFU: --peak-flops as given; "auto": the GPU table, else a measured peak."""
    if requested != "auto":
        return Peak(float(requested), "--peak-flops")
    if table := table_peak_flops(device, precision):
        return Peak(table, "GPU table")
    flops, share = measure_peak_flops(device, precision, shapes, cache_dir)
    source = "measured, cached" if share is None or share >= BUSY else (
        f"measured while other work held the CPU, {share:.0%} of the probe's threads' time: not cached, MFU reads high")
    return Peak(flops, source, (device, precision, shapes, cache_dir))


@dataclass
class Peak:
    """FLOP/s of one device that MFU divides by, never below a rate the run achieved: MFU stays <= 100%.

    A rate above the peak proves the peak low. A measured one was probed while other work held the
    machine (the probe keeps its best trial, but a neighbour can load a few cores through all of them):
    it is probed again, once a run, and the cache keeps the higher of that probe and the rate, a lower
    bound on the true peak. A peak given or from the table is raised to the rate. One line says so.
    """

    flops: float
    source: str  # "--peak-flops", "GPU table" or "measured, cached"
    probe_args: tuple = ()  # a measured peak's (device, precision, shapes, cache_dir): to probe it again
    probed_again: bool = False

    def utilization(self, rate: float, say=print) -> float:
        """`rate` (FLOP/s per device) over the peak, after raising a peak that `rate` exceeds."""
        if rate > self.flops:
            self.raise_to(rate, say)
        return rate / self.flops

    def raise_to(self, rate: float, say) -> None:
        """A peak of at least `rate`: a measured one is probed again (the first time) and corrected in the cache."""
        low, again = self.flops, bool(self.probe_args) and not self.probed_again
        self.flops = rate
        if self.probe_args:
            device, precision, shapes, cache_dir = self.probe_args
            if again:  # once a run: on a machine still busy a second probe would find no more than the first
                self.flops = max(rate, probe_peak_flops(device, precision, shapes)[0])
                self.probed_again = True
            remember(cache_dir, PEAK_CACHE, probe_key(device, precision, shapes), {"flops": self.flops})
        say(f"MFU: this run computed {rate / 1e9:,.1f} GFLOP/s per device, above the peak of {low / 1e9:,.1f} "
            f"({self.source}): " + ("measured again (the machine was busy when it was measured?), " if again else "")
            + f"the peak is now {self.flops / 1e9:,.1f} GFLOP/s")


# Seconds the probe spends on each shape: a warmup, then trials of back-to-back matmuls, the best kept.
PROBE_SECONDS = 1.0
PROBE_WARMUP = 0.4  # share of PROBE_SECONDS: matrix units (AMX) and clocks start cold and settle under load
PROBE_TRIALS = 6  # in rounds of half: rounds go on while they still find a better rate, up to PROBE_ROUNDS
PROBE_ROUNDS = 12
PROBE_SETTLED = 0.02  # a rate this much better than the best so far counts as better
PROBE_PATIENCE = 2
# Vocabulary columns in the probe's head matmul: a slice, as LinearCrossEntropy computes logits in chunks.
PROBE_VOCAB = 4096
PEAK_CACHE = "peak-flops.json"
# The share of its threads' wall time (process CPU time over wall x threads) the best trial of a CPU probe must have
# run for its rate to be the machine's: below, other processes held cores while it ran
BUSY = 0.9
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def probe_shapes(config, tokens: int) -> tuple[tuple[int, int, int], ...]:
    """(m, k, n) matmuls like a step's over `tokens` rows: the MLP's up projection and a slice of the head."""
    hidden = config.hidden_size
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    return (tokens, hidden, inner), (tokens, hidden, min(config.vocab_size, PROBE_VOCAB))


def measure_peak_flops(device: torch.device, precision: str, shapes: tuple[tuple[int, int, int], ...],
                       cache_dir: Path | str | None) -> tuple[float, float | None]:
    """(the best matmul FLOP/s seen at these shapes and precision, the CPU share its probe got: None if read back),
    cached per machine in cache_dir/peak-flops.json. A CPU probe that got less than BUSY of its threads' time (other
    processes held the cores) is not cached: it would make every later MFU read high. The next run probes again.

    The probe runs in the calling process, so it uses the thread count training will use (part of the key).
    """
    key = probe_key(device, precision, shapes)
    if "flops" in (known := recalled(cache_dir, PEAK_CACHE, key)):
        return known["flops"], None
    flops, share = probe_peak_flops(device, precision, shapes)
    if share >= BUSY:
        remember(cache_dir, PEAK_CACHE, key, {"flops": flops})
    return flops, share


def probe_peak_flops(device: torch.device, precision: str, shapes: tuple[tuple[int, int, int], ...]) -> tuple[float, float]:
    """(the best matmul FLOP/s seen now at these shapes and precision, the share of its threads' time the trial that
    ran at that rate had on the CPU: 1.0 on a GPU): a probe of a few seconds, not cached."""
    best = max(best_matmul_rate(device, DTYPES[precision], shape, PROBE_SECONDS) for shape in shapes)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the probe's buffers go back before training allocates
    return best


ATTENTION_CACHE = "attention.json"
IMPLEMENTATIONS = ("sdpa", "eager")  # the attention paths a CPU in bf16 chooses between


def choose_attention(device: torch.device, precision: str, config, batch: int, block: int,
                     cache_dir: Path | str | None) -> tuple[str | None, str]:
    """(attention implementation for transformers, why): "sdpa", "eager" (matmuls and a softmax), or None
    for transformers' own choice (SDPA where the model has it).

    On a GPU, SDPA's fused kernels; on a CPU in fp32, SDPA too. On a CPU in bf16 neither wins
    everywhere: SDPA's flash backward is several times slower in bf16 than in fp32, while plain
    matmuls run at the bf16 rate. So one layer of this model is timed, forward and backward at the
    run's shapes, with each, once per machine, and the faster kept (cached in cache_dir/attention.json).
    """
    if device.type != "cpu":
        return None, "transformers' default (SDPA's fused kernels where the model has them)"
    if precision == "fp32":  # the two take the same time within a few percent (measured), SDPA less memory
        return None, "transformers' default (SDPA where the model has it) in fp32"
    try:
        times = measured(cache_dir, ATTENTION_CACHE, attention_key(device, precision, config, batch, block), lambda: {
            impl: layer_seconds(config, impl, batch, block, precision, device) for impl in IMPLEMENTATIONS},
            needs=IMPLEMENTATIONS)
    except Exception as e:  # a config this probe can't shrink to one layer, a model without SDPA: their default
        return None, f"transformers' default (one layer could not be timed: {type(e).__name__})"
    best, other = sorted(IMPLEMENTATIONS, key=lambda impl: times[impl])
    return best, f"{best} attention, {times[best] * 1e3:.0f} ms per layer against {times[other] * 1e3:.0f} ({other})"


def attention_key(device: torch.device, precision: str, config, batch: int, block: int) -> str:
    """What choose_attention's timings depend on, readably: the machine, torch, precision, model shape, batch."""
    heads = getattr(config, "num_attention_heads", "?")
    return ", ".join([device_name(device), f"{torch.get_num_threads()} threads", f"torch {torch.__version__}",
                      precision, config.model_type, f"{batch}x{block}",
                      f"{config.hidden_size} wide, {heads} heads, {getattr(config, 'intermediate_size', '?')} inner"])


def planned_attention(device: torch.device, precision: str, config, batch: int, block: int,
                      cache_dir: Path | str | None) -> str | None:
    """The attention choose_attention will pick, without timing anything: its kept choice, else, where it would
    time the two, eager (which keeps the attention probabilities for backward: the more memory of the two)."""
    if device.type != "cpu" or precision == "fp32":
        return None
    times = recalled(cache_dir, ATTENTION_CACHE, attention_key(device, precision, config, batch, block))
    return min(IMPLEMENTATIONS, key=times.get) if all(impl in times for impl in IMPLEMENTATIONS) else "eager"


def layer_seconds(config, implementation: str, batch: int, block: int, precision: str, device: torch.device,
                  repeats: int = 3) -> float:
    """Best seconds of a forward and backward through a one-layer copy of `config`'s model body."""
    import copy

    import transformers

    one = copy.deepcopy(config)
    one.num_hidden_layers = 1
    if isinstance(getattr(one, "layer_types", None), list):  # per-layer attention kinds (Qwen3, Gemma...)
        one.layer_types = one.layer_types[:1]
    with torch.random.fork_rng(devices=[]):  # random weights and dropout, none drawn from training's generators
        torch.manual_seed(0)
        body = transformers.AutoModel.from_config(one, attn_implementation=implementation).to(device).train()
        states = torch.randn(batch, block, config.hidden_size, device=device)  # the layer alone, no embedding table
        best = float("inf")
        for _ in range(repeats + 1):  # the first pays for set-up
            started = time.perf_counter()
            with autocast(device, precision):
                out = body(inputs_embeds=states).last_hidden_state
            out.float().square().mean().backward()
            best = min(best, time.perf_counter() - started)
    return best


def probe_key(device: torch.device, precision: str, shapes: tuple[tuple[int, int, int], ...]) -> str:
    """What a measured peak depends on, readably: the device, threads, torch, precision (TF32 or not), shapes."""
    parts = [device_name(device), f"{torch.get_num_threads()} threads", f"torch {torch.__version__}", precision]
    if precision == "fp32" and device.type == "cuda":
        parts.append(f"tf32 {torch.backends.cuda.matmul.allow_tf32}")
    return ", ".join(parts + [" ".join("x".join(map(str, shape)) for shape in shapes)])


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and core count (for MPS too: the chip is both)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo() if line.startswith("model name")), None)
    return f"{device.type} {cpu or platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def machine_summary(device: torch.device) -> str:
    """The device's name, torch, and for a CPU the features that decide bf16: for benchmark headers."""
    if device.type != "cpu":
        return f"{device_name(device)}, torch {torch.__version__}"
    words = " ".join(cpuinfo()).split()
    flags = sorted({f for f in ("avx512_bf16", "amx_tile", "amx_bf16") if f in words})
    return (f"{device_name(device)}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"flags: {' '.join(flags) or 'no native bf16 (AVX2 only)'}")


def cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        return []


def best_matmul_rate(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int],
                     seconds: float) -> tuple[float, float]:
    """Best FLOP/s of (m, k) activations times an (n, k) weight: warm up, then the best of PROBE_TRIALS trials.

    A cold probe disagrees with itself: AMX units and GPU clocks start cold, and a busy CPU's clock
    takes a moment to settle, so the first PROBE_WARMUP of `seconds` runs untimed, and each trial
    times many calls back to back (short bursts catch transients). The best trial is kept: other
    load only ever slows one down; and rounds of trials go on until PROBE_PATIENCE in a row found no
    better rate (a busy neighbour can halve a 2-core machine's rate for a second); with it, the share of its threads'
    time the best trial had on a CPU (1.0 on a GPU). The weight is laid out as nn.Linear keeps it. Before all that,
    the rows double from 16 up to m until one call takes a twentieth of `seconds`: emulated bf16 (a
    CPU without it) is ~10x slower than fp32 and would take seconds per call at a large shape.
    """
    m, k, n = shape
    g = torch.Generator(device).manual_seed(0)  # its own: the global generators belong to training
    x = torch.randn(m, k, device=device, dtype=dtype, generator=g)
    weight = torch.randn(n, k, device=device, dtype=dtype, generator=g)
    rows = min(m, 16)
    timed_matmuls(x[:rows], weight, 1, device)  # the first call pays for library set-up
    while (took := min(timed_matmuls(x[:rows], weight, 1, device)[0] for _ in range(2))) < seconds / 20 and rows < m:
        rows = min(m, 2 * rows)
    trial = (1 - PROBE_WARMUP) * seconds / PROBE_TRIALS
    calls = max(1, int(trial / took))
    timed_matmuls(x[:rows], weight, max(1, int(PROBE_WARMUP * seconds / took)), device)
    best, since_better = (0.0, 0.0), 0
    for _ in range(PROBE_ROUNDS):  # until PROBE_PATIENCE rounds in a row found nothing better: load has passed
        rate = max((2 * rows * k * n * calls / wall, share)
                   for wall, share in (timed_matmuls(x[:rows], weight, calls, device) for _ in range(PROBE_TRIALS // 2)))
        since_better = since_better + 1 if rate[0] < best[0] * (1 + PROBE_SETTLED) else 0
        best = max(best, rate)
        if since_better == PROBE_PATIENCE:
            break
    return best


def timed_matmuls(x: torch.Tensor, weight: torch.Tensor, calls: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds of `calls` back-to-back F.linear(x, weight), waiting for the device at both ends; the share of
    that time x the threads the process ran on a CPU: below 1, other processes held cores; 1.0 on a GPU)."""
    synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        F.linear(x, weight)
    synchronize(device)
    wall = time.perf_counter() - start
    if device.type != "cpu":
        return wall, 1.0
    return wall, (time.process_time() - cpu) / (wall * torch.get_num_threads())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class FlopCounts(NamedTuple):
    """What a model's training FLOPs depend on: step_flops(*counts, seq_len, input_tokens, predicted_tokens)."""

    body: float  # parameters that multiply every input token (embedding tables excluded: a lookup does no FLOPs)
    head: float  # parameters of a split vocabulary head, which runs on the labelled positions only
    # (a frozen parameter, under LoRA, counts 2/3: no weight gradient, so 4 FLOPs per token, not 6)
    layers: int
    width: int  # attention heads x head size: the hidden size in most models


def flop_counts(model: nn.Module) -> FlopCounts:
    """The parameters a step multiplies, split as TokenLoss runs them, and the attention's dimensions.

    A weight tied to an embedding table (GPT-2's and SmolLM2's head) counts once, where it does
    work: in the head. An untied model counts the same; its input table does no FLOPs either. A
    model without a split head runs its head on every position: then it is part of `body`. A frozen
    weight (LoRA's base) gets no gradient of its own: it counts 2/3 of a trained one.
    """
    config = model.config
    split = split_head(model)
    head = {id(p): p for p in getattr(model, split[1]).parameters()} if split else {}
    multiplied = {id(p): p for module in model.modules() if not isinstance(module, nn.Embedding)
                  for p in module.parameters(recurse=False)}  # tied: the same tensor, once
    def count(p):
        return p.numel() if p.requires_grad else p.numel() * 2 / 3

    body = sum(count(p) for key, p in multiplied.items() if key not in head)
    heads = config.num_attention_heads
    width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    return FlopCounts(body, sum(count(p) for p in head.values()), config.num_hidden_layers, width)


def step_flops(body_params: int, head_params: int, n_layers: int, width: int, seq_len: int,
               input_tokens: int, predicted_tokens: int) -> float:
    """Training FLOPs (forward + backward) of a batch: 6 per weight per token it multiplies, plus attention.

    Weights: 2 FLOPs per multiply-add forward, 4 backward (gradients of inputs and of weights).
    Attention: QK^T and AV cost 2*2*width*seq_len per token and layer forward, x3 with backward.
    That counts all seq_len keys, causal or not, as nanoGPT and PaLM do: a causal kernel that skips
    the masked half does less, so CLM's attention term is up to 2x what runs (at 128 tokens it is ~3%
    of SmolLM2's FLOPs).
    Count real tokens, not padding: MFU then charges padding as waste.
    """
    attention = 12 * n_layers * width * seq_len
    return 6 * body_params * input_tokens + 6 * head_params * predicted_tokens + attention * input_tokens
