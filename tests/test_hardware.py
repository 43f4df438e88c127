import pytest
import torch

from lm.errors import UsageError
from lm.hardware import autocast, choose_precision, resolve_device


@pytest.mark.parametrize("device, native, expected", [
    ("cuda", True, "bf16"), ("cuda", False, "fp32"), ("cpu", True, "bf16"), ("cpu", False, "fp32"),
    ("mps", False, "fp32"),
])
def test_auto_picks_bf16_only_where_the_hardware_has_it(device, native, expected):
    assert choose_precision("auto", device, native)[0] == expected


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
