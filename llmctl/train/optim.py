"""AdamW with decay only on >=2-D weights, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices / embeddings decay, vectors (biases, norm gains) do not.

    Tied parameters appear once (`named_parameters` de-duplicates shared tensors).
    """
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # no_weight_decay: e.g. an embedding of which only a few rows train (LoRA with new
        # tokens), whose other rows must stay bitwise
        decayed = param.dim() >= 2 and not getattr(param, "no_weight_decay", False)
        (decay if decayed else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def fused_available(device: torch.device) -> bool:
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return device.type in _get_fused_kernels_supported_devices()


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW at the schedule's first learning rate; fused kernels where the device has them."""
    if fused is None:
        fused = fused_available(device)
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                             betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=fused or None)


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to `final` at `total`."""

    peak: float
    final: float
    warmup: int
    total: int

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> LRSchedule:
        return cls(peak=cfg.learning_rate, final=cfg.final_lr, warmup=cfg.warmup_steps,
                   total=cfg.max_iters)

    def __call__(self, step: int) -> float:
        """Learning rate for the optimizer step with 0-based index `step`."""
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if step >= self.total:
            return self.final
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.final + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.peak - self.final)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
