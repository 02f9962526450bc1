"""Device and dtype resolution, autocast, and the grad scaler state."""

from __future__ import annotations

import pytest
import torch

from llmctl.core.errors import LlmctlError
from llmctl.runtime.device import Precision, activation_bytes, resolve_device, resolve_dtype


def test_cpu_defaults_to_fp32_without_scaler():
    p = Precision.from_names("cpu", "auto")
    assert p.device == torch.device("cpu") and p.dtype == torch.float32
    assert not p.scaler.is_enabled() and p.scaler_state() == {}
    with p.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_bf16_autocast_on_cpu():
    p = Precision.from_names("cpu", "bfloat16")
    with p.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_clear_errors():
    with pytest.raises(LlmctlError, match="float16 is not supported on CPU"):
        resolve_dtype("float16", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(LlmctlError, match="CUDA is not available"):
            resolve_device("cuda")
        assert resolve_device("auto") in (torch.device("cpu"), torch.device("mps"))
    with pytest.raises(LlmctlError, match="cuda:99999999999999: not a device"):
        resolve_device("cuda:99999999999999")


@pytest.mark.gpu
def test_cuda_auto_is_bf16_or_fp16_with_scaler():
    p = Precision.from_names("auto", "auto")
    assert p.device.type == "cuda"
    assert p.dtype in (torch.bfloat16, torch.float16)
    assert p.scaler.is_enabled() == (p.dtype == torch.float16)
    fp16 = Precision.from_names("cuda", "float16")
    state = fp16.scaler_state()
    assert state["scale"] > 0
    fresh = Precision.from_names("cuda", "float16")
    fresh.load_scaler_state({**state, "scale": 128.0})
    assert fresh.scaler.get_scale() == 128.0


@pytest.mark.parametrize("device,dtype,expected", [
    ("cpu", "auto", 4), ("cuda", "auto", 2), ("cuda", "float32", 4), ("cpu", "bfloat16", 2),
    ("auto", "auto", 2 if torch.cuda.is_available() else 4),  # as the trainer resolves it here
])
def test_activation_bytes_follow_the_trainers_precision(device: str, dtype: str,
                                                        expected: int) -> None:
    assert activation_bytes(device, dtype) == expected


def test_inspect_params_reports_the_trainers_activation_width() -> None:
    from typer.testing import CliRunner

    from llmctl.cli import app

    for device, width in (("cpu", "fp32"), ("cuda", "16-bit autocast")):
        result = CliRunner().invoke(app, ["inspect-params", "--device", device, "--n_layer", "2"])
        assert result.exit_code == 0, result.output
        assert f"{width} activations" in result.output
