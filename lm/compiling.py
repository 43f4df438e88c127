"""When and how to torch.compile: whether Inductor can run here, what compiling costs and saves (measured on
this machine and kept in CACHE_DIR/compile.json, else estimated), whether that pays within a run, and
`Compiling`, which holds a run's decision and its bookkeeping so that the loop calls it once a step.

What is compiled is the model's repeated block (each transformer layer, regional compilation): Inductor
compiles one layer's graph and reuses it for the other layers, so compiling takes seconds where the
whole model took over a minute; embeddings, final norm and the fused head run eagerly."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch._dynamo
import torch._inductor.exc

from lm import distributed
from lm.cache import recalled, remember
from lm.errors import UsageError
from lm.hardware import device_name


def check_compile(requested: str, device: torch.device, cache_dir: Path | str | None) -> str | None:
    """Why torch.compile can't run here, or None: the device has no Inductor backend, or building a tiny
    kernel failed (compile_probe). Under --compile on that is an error before training; auto stays eager,
    and probes only when it is about to compile (an eager run never pays for the probe)."""
    why = None
    if device.type == "mps":
        why = "--compile is not supported on Apple MPS here; drop --compile or use --device cpu"
    elif requested == "on":
        why = compile_probe(device, cache_dir)
        why = why and f"{why}; or drop --compile"
    if why and requested == "on":
        raise UsageError(why)
    return why


PROBE_CACHE = "compile-probe.json"
# Compiles a function forward and backward on DEVICE, with Inductor's and Triton's caches empty so that
# a kernel is really built, and prints why not in one line if it fails.
PROBE_SCRIPT = """
import sys, torch
try:
    x = torch.randn(8, 8, device=sys.argv[1], requires_grad=True)
    torch.compile(lambda t: (t.sin() * 2).sum())(x).backward()
except Exception as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    said = [l for l in lines if "error" in l.lower() and l != lines[0]][:1]
    print(" / ".join([f"{type(e).__name__}: {lines[0] if lines else ''}"] + said)[:300], file=sys.stderr)
    sys.exit(1)
"""
PROBE_TIMEOUT = 600  # seconds: a cold Inductor start on a slow machine takes tens of them


def compile_probe(device: torch.device, cache_dir: Path | str | None) -> str | None:
    """Why Inductor can't build a kernel on this device, or None once it has: a tiny compile, forward and
    backward, in a child process (a failure there can't leave this one half set up). A success is kept in
    cache_dir/compile-probe.json under the machine, torch and the compilers found; a failure is not kept,
    so installing what was missing is seen by the next run."""
    key = compile_probe_key(device)
    if recalled(cache_dir, PROBE_CACHE, key).get("ok"):
        return None
    with tempfile.TemporaryDirectory(prefix="lm-compile-probe-") as tmp:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(tmp, "inductor"),
               "TRITON_CACHE_DIR": os.path.join(tmp, "triton")}
        try:
            done = subprocess.run([sys.executable, "-c", PROBE_SCRIPT, str(device)], env=env, capture_output=True,
                                  text=True, timeout=PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            return f"torch.compile could not build a test kernel within {PROBE_TIMEOUT} s here"
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        needs = ("a working C++ compiler (g++, or $CXX) and the Python headers (python3-dev)" if device.type == "cpu"
                 else "a working C compiler (gcc, or $CC) for Triton")
        return f"torch.compile could not build a test kernel here ({said}); it needs {needs}"
    remember(cache_dir, PROBE_CACHE, key, {"ok": 1})
    return None


def compile_probe_key(device: torch.device) -> str:
    """What the probe's answer depends on: the machine, torch, this Python and the compilers found."""
    return ", ".join([device_name(device), f"torch {torch.__version__}", sys.executable, *compilers()])


def compilers() -> list[str]:
    """The compilers Inductor (C++: $CXX, else g++) and Triton (C: $CC, else gcc or cc) would run, each with
    its file's size and time: a new or replaced compiler is probed afresh."""
    found = []
    for name in (os.environ.get("CXX") or "g++", os.environ.get("CC") or "gcc", "cc"):
        path = shutil.which(name)
        if path:
            st = os.stat(path)
            found.append(f"{name}={os.path.realpath(path)} ({st.st_size} bytes, {st.st_mtime_ns})")
        else:
            found.append(f"{name}=none")
    return found


# What a failed compile raises: Dynamo's errors (Inductor's InductorError among them, with a compiler's
# error inside) and Inductor's compile errors raised outside Dynamo (a backward compiled lazily).
COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError,
                  torch._inductor.exc.CppCompileError)


# The share of a training step's time that compiling the layers saves, by kind of device and precision, as
# measured for the causal default (SmolLM2, 8 x 128; docs/precision-and-compile.md): the estimate until this machine
# has measured it for the model at hand. Absent: no estimate, so a run long enough compiles to measure it
# (COMPILE_TRIAL).
COMPILE_GAIN = {("cpu-amx", "bf16"): 0.25, ("cpu-avx512_bf16", "bf16"): 0.15, ("cuda", "bf16"): 0.8}
# Seconds a cold compile of one layer's graph takes (regional compilation compiles one, whatever the
# depth), by kind of device: the estimate until a run here has measured it.
COMPILE_SECONDS = {"cpu": 25.0, "cuda": 30.0}
# A compile that finds Inductor's kernels cached takes this share of the first, cold one: the estimate
# after one compile, until a second has measured it.
COMPILE_WARM_SHARE = 0.25
# A gain measured here is trusted once measured twice (one noisy measurement of a loss would keep auto off
# for good), and for this many decisions after its last measurement; then the table's estimate decides
# again, so that a run compiles and measures anew.
COMPILE_TRUSTED = 2
COMPILE_STALE_AFTER = 20
COMPILE_CACHE = "compile.json"
COMPILE_AFTER = 3  # --compile auto decides after this many eager steps, from their time
COMPILE_SETTLE = 3  # compiled steps that compile, record CUDA graphs and warm up, counted as the compile's cost
COMPILE_TIMED = 3  # compiled steps after those, timed against the eager ones
# With no estimate of the gain, auto compiles to measure it where the steps left take this many times what compiling
# costs: a compile that saves nothing then costs the run a tenth at most, and the run goes back to eager if slower.
COMPILE_TRIAL = 10


def compile_pays(steps_left: int, step_seconds: float, compile_seconds: float,
                 gain: float | None) -> tuple[bool, str]:
    """(compile now?, why): whether the time compiling saves over the steps left beats what compiling costs; with
    no estimate of the gain (None), whether the steps left leave room to compile and measure it."""
    if gain is None:
        left = step_seconds * steps_left
        if left >= COMPILE_TRIAL * compile_seconds and steps_left >= COMPILE_SETTLE + COMPILE_TIMED:
            return True, (f"on, to measure what it saves here: ~{compile_seconds:.0f} s of compiling against "
                          f"~{left:.0f} s of {steps_left} steps left")
        return False, (f"off: what it saves is not known here, and ~{left:.0f} s of {steps_left} steps left are "
                       f"too few to measure it against ~{compile_seconds:.0f} s of compiling")
    if gain <= 0:
        return False, "off: compiling was measured not to make these steps faster here"
    saved = gain * step_seconds * steps_left
    return saved > compile_seconds, (f"{'on' if saved > compile_seconds else 'off'}: ~{saved:.0f} s saved over "
                                     f"{steps_left} steps ({gain:.0%} of each) against ~{compile_seconds:.0f} s "
                                     "of compiling")


def compile_key(device: torch.device, precision: str, config, cfg, block: int) -> str:
    """What the cost and gain of compiling a model depend on, readably: the machine and its threads, the
    versions, the numerics, the model's shapes and what changes its graphs (checkpointing, texts kept apart,
    adapters)."""
    import transformers

    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or "?"
    graph = [name for name, on in (("gradient checkpointing", cfg.gradient_checkpointing),
                                   ("document boundaries", cfg.document_boundaries),
                                   (f"LoRA rank {cfg.lora_rank}", cfg.lora_rank)) if on]
    return ", ".join([device_name(device), f"{torch.get_num_threads()} threads", f"torch {torch.__version__}",
                      f"transformers {transformers.__version__}", precision, config.model_type,
                      f"{getattr(config, 'num_hidden_layers', '?')} layers of {config.hidden_size} ({inner} inner)",
                      f"vocabulary {config.vocab_size}", f"{cfg.batch_size}x{block}", *graph])


def device_kind(device: torch.device) -> str:
    """The kind of device compiling's gain depends on: cuda, or a CPU by its bf16 instructions."""
    if device.type != "cpu":
        return device.type
    if torch.cpu._is_amx_tile_supported():
        return "cpu-amx"
    return "cpu-avx512_bf16" if torch.cpu._is_avx512_bf16_supported() else "cpu"


def compile_estimate(cache_dir: Path | str | None, key: str, kind: str, precision: str,
                     decide: bool = False) -> tuple[float, float | None, str]:
    """(seconds compiling takes, share of a step it saves, where that comes from): what this machine measured
    for `key` where it is trusted, else the tables for this kind of device. After a single compile, which
    was cold, Inductor's cache holds the kernels: the next is estimated at COMPILE_WARM_SHARE of it.
    The share is None where neither gives one. `decide`: count this as a decision made on the measured gain (it goes
    stale after COMPILE_STALE_AFTER)."""
    known = recalled(cache_dir, COMPILE_CACHE, key)
    seconds = known.get("seconds", COMPILE_SECONDS.get(kind.split("-")[0], 30.0))
    if known.get("compiles") == 1:
        seconds *= COMPILE_WARM_SHARE
    measured, decisions = known.get("measurements", 0), known.get("decisions", 0)
    if "gain" in known and measured >= COMPILE_TRUSTED and decisions < COMPILE_STALE_AFTER:
        if decide:
            remember(cache_dir, COMPILE_CACHE, key, {"decisions": decisions + 1})
        return seconds, known["gain"], f"measured here {measured} times"
    why = ("measured here once" if measured == 1 else f"measured {decisions} runs ago" if measured
           else "not measured here yet")
    gain = COMPILE_GAIN.get((kind, precision))
    return seconds, gain, f"{'no' if gain is None else 'the'} estimate for {kind} in {precision}; {why}"


def record_compile(cache_dir: Path | str | None, key: str, seconds: float, gain: float | None) -> None:
    """Keep what a compiled run measured: the least a compile has taken (with Inductor's cache warm: a cold
    compile after a change of code is paid once) and, when eager steps came first, the gain, averaged with
    the last ones (a run compiled from its first step leaves the gain as it was)."""
    known = recalled(cache_dir, COMPILE_CACHE, key)
    entry = {"seconds": min(seconds, known.get("seconds", seconds)), "compiles": known.get("compiles", 0) + 1}
    if gain is not None:
        n = min(known.get("measurements", 0), COMPILE_TRUSTED)  # the mean of about the last few
        entry.update(gain=(known.get("gain", 0.0) * n + gain) / (n + 1), measurements=known.get("measurements", 0) + 1,
                     decisions=0)
    remember(cache_dir, COMPILE_CACHE, key, entry)


@contextlib.contextmanager
def inductor_cache(cache_dir: Path | str):
    """Inductor's (and Triton's) files under cache_dir/inductor for the block, as they were after it.

    Inductor reads TORCHINDUCTOR_CACHE_DIR when it first needs its cache and writes its default back into
    the environment, so the variable is set here, for the run, rather than defaulted deep inside it."""
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    with temporary_cache_dir(str(Path(cache_dir).absolute() / "inductor")):
        yield


@dataclass
class Compiling:
    """A run's compiling: under --compile on from its first step; under auto from the step after COMPILE_AFTER
    if the time it saves pays for compiling, or, with no estimate of that, to measure it in a run long enough (and
    back to eager once its steps measure slower); never under off.
    It also times the first compiled steps against the eager ones, for the next run's decision.

    `since` and `until` (the steps between which training steps run compiled) go into checkpoints: a resumed
    run compiles where the uninterrupted run did."""

    requested: str  # on, auto or off
    device: torch.device
    precision: str
    key: str  # compile_key: what the cost and gain of compiling depend on
    cache_dir: Path | None = None  # where compile.json and the probe's answer are kept
    cannot: str | None = None  # why torch.compile can't run here: auto stays eager
    since: int | None = None  # training steps after this one run compiled
    until: int | None = None  # ... up to this one (auto measured them slower, or compiling failed)
    blocks: list = field(default_factory=list)  # the compiled modules
    seconds: dict = field(default_factory=dict)  # optimizer step -> seconds, of this process's steps

    @property
    def active(self) -> bool:
        return bool(self.blocks)

    def state(self) -> dict:
        """What a checkpoint keeps."""
        return {"since": self.since, "until": self.until}

    def begin(self, model, step: int, saved: dict | None = None) -> None:
        """Before this process's first training step (`step` done already): compile under --compile on, or where
        the run resumed from (its checkpoint's `saved` state) ran compiled at this step."""
        if saved:
            self.since, self.until = saved.get("since"), saved.get("until")
        resumed_compiled = self.since is not None and (self.until is None or self.until > step)
        if self.requested == "on" or (self.requested == "auto" and resumed_compiled):
            self.compile(model, step)

    def after_step(self, model, step: int, seconds: float, steps_left: int, world, say) -> None:
        """Once per optimizer step: auto decides after step COMPILE_AFTER; the first compiled steps are timed."""
        self.seconds[step] = seconds
        if self.requested == "auto" and step == COMPILE_AFTER and self.since is None and self.until is None:
            on, why = distributed.run_on_main(world, lambda: self.decide(steps_left))
            say(f"compile {why}")
            if on:
                self.compile(model, step)
        elif self.active and step == self.since + COMPILE_SETTLE + COMPILE_TIMED:
            self.measured(model, step, world, say)

    def decide(self, steps_left: int) -> tuple[bool, str]:
        """(compile now?, why), from the eager steps' time and what compiling costs and saves here."""
        if self.cannot:
            return False, f"off: {self.cannot}"
        cost, gain, source = compile_estimate(self.cache_dir, self.key, device_kind(self.device), self.precision,
                                              decide=True)
        on, why = compile_pays(steps_left, statistics.median(self.eager_seconds()), cost, gain)
        why += f" ({source})"
        cannot = compile_probe(self.device, self.cache_dir) if on else None  # cached once it builds
        return (False, f"off: {cannot}") if cannot else (on, why)

    def eager_seconds(self) -> list[float]:
        """This process's eager steps, the first left out when there are others (it pays for warm-ups)."""
        eager = [s for step, s in sorted(self.seconds.items()) if self.since is None or step <= self.since]
        return eager[1:] or eager

    def measured(self, model, step: int, world, say) -> None:
        """Keep what compiling cost (the settling steps over the timed ones) and saved (against the eager steps)
        for the next run; under auto, compiled steps slower than eager ones send this run back to eager."""
        compiled = [self.seconds[s] for s in range(self.since + 1, step + 1) if s in self.seconds]
        settling, timed = compiled[:COMPILE_SETTLE], statistics.median(compiled[COMPILE_SETTLE:])
        eager = [s for k, s in sorted(self.seconds.items()) if k <= self.since][1:]
        gain = distributed.broadcast_from_main(world, 1 - timed / statistics.median(eager) if eager else None)
        if world.main:
            record_compile(self.cache_dir, self.key, max(0.0, sum(settling) - len(settling) * timed), gain)
        if self.requested == "auto" and gain is not None:
            say(f"compile: steps {gain:.0%} faster compiled" + ("" if gain > 0 else "; eager again from here"))
            if gain <= 0:
                self.uncompile(step)

    def compile(self, model, step: int) -> None:
        """torch.compile each transformer layer of `model` (lm.modeling.transformer_layers) in place (names in state dicts stay plain)."""
        from lm.modeling import transformer_layers

        # on CUDA the layers are replayed as CUDA graphs: at small batches a step is mostly kernel launches
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        self.blocks = [block for _, block in transformer_layers(model)]
        for block in self.blocks:
            block.compile(mode=mode)
        self.since = step if self.since is None else self.since

    def uncompile(self, step: int) -> None:
        """Eager from the step after `step` on."""
        for block in self.blocks:
            block._compiled_call_impl = None  # nn.Module.compile's: calls go to forward again
        self.blocks, self.until = [], step
        torch._dynamo.reset()  # the compiled code held the model

    def stance(self, training: bool):
        """Evaluation and samples run eagerly (graphs for them would cost more compiles, each a recompile of the
        training step's); so does everything uncompiled."""
        return torch.compiler.set_stance("force_eager") if self.active and not training else contextlib.nullcontext()

    def steps_compiled(self, step: int) -> int:
        """How many training steps up to `step` ran compiled."""
        if self.since is None:
            return 0
        return max(0, min(step, self.until if self.until is not None else step) - self.since)
