"""Device and precision: one home for the device choice (auto = cuda > mps > cpu), the autocast
dtype, the fp16 grad scaler, and what they mean for memory estimates."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..config.schema import DEVICE_CHOICES, DEVICE_NAMES, DTYPES
from ..core.errors import LlmctlError, one_of

if TYPE_CHECKING:
    from ..config import RunConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' → cuda > mps > cpu; under torchrun each rank takes cuda:local_rank."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's device index is one byte: cuda:99999 does not parse
        raise LlmctlError(f"--device {name}: not a device (auto, cpu, cuda, cuda:N with N "
                          "< 128, or mps)") from None
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


def precision_for(device: str = "auto", dtype: str = "auto") -> Precision:
    """The trainer's device choice and autocast dtype for user-given names, with a clear
    error for a device or dtype name that is not one (sample, eval)."""
    if dtype not in DTYPES:
        raise LlmctlError(f"--dtype: {one_of(dtype, DTYPES)}")
    if not DEVICE_NAMES.match(device):  # the same devices `train` accepts
        raise LlmctlError(f"--device {device!r} is not one of {DEVICE_CHOICES}")
    return Precision.from_names(device, dtype)


def activation_bytes(device: str, dtype: str) -> int:
    """Bytes per activation number when training with these --device / --dtype names
    (2 under 16-bit autocast, 4 in fp32), without touching a device: 'auto' resolves as it
    would on this machine; plan a GPU run from a CPU machine with --device cuda."""
    kind = device.split(":")[0]
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else (
            "mps" if torch.backends.mps.is_available() else "cpu")
    return resolve_dtype(dtype, torch.device(kind)).itemsize


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes a new allocation may still take on `device`, where that number comes from);
    None when it cannot be told. CPU: MemAvailable, and the address-space limit if set."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory on {device}"
    import resource

    found: list[tuple[int, str]] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append((int(line.split()[1]) * 1024, "MemAvailable"))
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm", encoding="ascii") as f:
                used = int(f.read().split()[0]) * resource.getpagesize()
            found.append((max(0, soft - used), "the address-space limit (ulimit -v) left"))
    except (OSError, ValueError):
        pass
    return min(found) if found else (None, "unknown")


def check_fits(need: dict[str, int], device: torch.device, what: str, advice: str) -> None:
    """Refuse work whose memory estimate (`need`: parts and 'total') exceeds what `device`
    has available, naming the estimate, its parts and the available memory."""
    from ..core.units import human_bytes

    available, source = available_memory(device)
    if available is None or need["total"] <= available:
        return
    parts = ", ".join(f"{k.replace('_', ' ')} {human_bytes(v)}" for k, v in need.items()
                      if k != "total" and v)
    raise LlmctlError(f"{what} needs about {human_bytes(need['total'])} ({parts}), but only "
                      f"{human_bytes(available)} is available ({source}); {advice}")


def check_training_fits(run: RunConfig, device: torch.device, world_size: int = 1) -> None:
    """Refuse a run whose weights, gradients, optimizer states and activations cannot fit on
    `device` (model.costs' estimate is a lower bound: what could fit is never refused)."""
    from ..model.costs import memory_estimate, parameter_counts

    train = run.train
    n_params = parameter_counts(run.model)["total"]
    act_bytes = resolve_dtype(train.dtype, device).itemsize
    est = memory_estimate(run.model, train, n_params, act_bytes)
    trained = 0 if train.lora else est["grads"] + est["adamw_states"]  # LoRA: adapters only
    shards = world_size if train.fsdp else 1
    need = {"states": (est["weights"] + trained) // shards,
            "activations": est["activations_act_recomp" if train.act_recomp else "activations"]}
    need["total"] = sum(need.values())
    check_fits(need, device, f"training {n_params:,} parameters at batch_size "
               f"{train.batch_size} × block_size {run.model.block_size}",
               "use a smaller model or --batch_size (or --act_recomp)")
