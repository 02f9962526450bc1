"""Device choice, autocast dtype and the fp16 grad scaler."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..core.errors import LlmctlError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' → cuda > mps > cpu; under torchrun each rank takes cuda:local_rank."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LlmctlError(f"--device {name}: CUDA is not available on this machine "
                              "(use --device cpu or auto)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise LlmctlError(f"--device {name}: only {torch.cuda.device_count()} CUDA "
                              "device(s) visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LlmctlError(f"--device {name}: MPS is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' → bf16 on CUDA when supported, else fp16 there; fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = _DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise LlmctlError("--dtype float16 is not supported on CPU; use float32 or bfloat16")
    return dtype


@dataclass
class Precision:
    """Weights stay fp32; forward passes autocast to `dtype`; fp16 gets a grad scaler."""

    device: torch.device
    dtype: torch.dtype

    def __post_init__(self) -> None:
        enabled = self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=enabled)

    @classmethod
    def from_names(cls, device: str, dtype: str, local_rank: int = 0) -> Precision:
        dev = resolve_device(device, local_rank)
        return cls(dev, resolve_dtype(dtype, dev))

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scaler_state(self) -> dict:
        """JSON-ready scaler state ({} when no scaler is in use)."""
        if not self.scaler.is_enabled():
            return {}
        return {k: (v.item() if isinstance(v, torch.Tensor) else v)
                for k, v in self.scaler.state_dict().items()}

    def load_scaler_state(self, state: dict) -> None:
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)
