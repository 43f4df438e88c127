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
