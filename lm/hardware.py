"""Which device and which numerics a run uses, decided by pure functions the tests can call."""

from __future__ import annotations

import contextlib

import torch

from lm.errors import UsageError


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
        return torch.cuda.is_bf16_supported()
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


def check_compile(compile: bool, device: torch.device) -> None:
    """--compile needs Inductor's backend for the device: CUDA, or a CPU with a C++ compiler."""
    if not compile:
        return
    if device.type == "mps":
        raise UsageError("--compile is not supported on Apple MPS here; drop --compile or use --device cpu")
    if device.type == "cpu":
        import shutil

        if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
            raise UsageError("--compile on CPU needs a C++ compiler (g++ or clang++) on PATH; install one or drop --compile")


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


# Dense bf16/fp16 tensor-core peak of one GPU, TFLOP/s, by a substring of its name (first match wins).
PEAK_TFLOPS = [("H200", 989), ("H100 PCIe", 756), ("H100", 989), ("A100", 312), ("L40S", 362), ("L4", 121),
               ("A10", 125), ("RTX 4090", 165), ("RTX 3090", 71), ("V100", 125), ("T4", 65)]


def peak_flops(device: torch.device, precision: str, override: float | None = None) -> float | None:
    """FLOP/s the device could do at this precision: --peak-flops, else the GPU table; None if unknown."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    tflops = next((t for key, t in PEAK_TFLOPS if key in name), None)
    if tflops is None:
        return None
    return tflops * 1e12 / (2 if precision == "fp32" else 1)  # fp32 runs as TF32: half the bf16 rate


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights (forward + backward) plus attention's 12*L*H*T."""
    return 6 * n_params + 12 * n_layers * hidden * seq_len
