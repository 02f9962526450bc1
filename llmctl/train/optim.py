"""The optimizers (AdamW with decay only on >=2-D weights; or Muon for the 2-D hidden
weights with AdamW for the rest) and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import TrainConfig
from ..config.schema import OPTIMIZERS  # noqa: F401  (the choices, re-exported)


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
                    fused: bool | None = None) -> torch.optim.Optimizer | MuonWithAdamW:
    """cfg.optimizer at the schedule's first learning rate; fused AdamW kernels where the
    device has them."""
    if fused is None:
        fused = fused_available(device)
    if cfg.optimizer == "muon":
        hidden, rest = muon_split(model)
        adamw = torch.optim.AdamW(_decay_groups(rest, cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused or None)
        scale = cfg.muon_learning_rate / cfg.learning_rate
        # match_rms_adamw: the update's RMS is AdamW's (0.2 * sqrt(max(A, B)) scaling), so
        # Muon shares the learning rate, schedule and weight decay of AdamW
        muon = Muon([{"params": hidden, "lr_scale": scale}], lr=cfg.muon_learning_rate,
                    weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum)
        return MuonWithAdamW(adamw, muon)
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                             betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=fused or None)


def muon_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(2-D hidden weights for Muon, everything else for AdamW).

    Muon orthogonalises matrix updates, which suits the linear maps inside the blocks; the
    embeddings and LM head (lookups / a classifier), norm gains, biases, the MoE router
    (a small classifier) and the 3-D stacked expert weights (torch's Muon takes 2-D only)
    stay with AdamW."""
    hidden, rest = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_block = name.startswith("blocks.")
        is_hidden = in_block and param.dim() == 2 and ".router" not in name
        (hidden if is_hidden else rest).append(param)
    return hidden, rest


def _decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class Muon(torch.optim.Muon):
    """torch.optim.Muon (Nesterov, match_rms_adamw) whose Newton-Schulz runs in bf16 only on
    CUDA: torch's always casts to bf16, which on CPUs without bf16 matmul units is ~20x
    slower than fp32 (measured: 18 ms vs 0.75 ms for a 128 x 512 iteration) and made a Muon
    step cost more than the whole forward/backward. The arithmetic is torch's."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float):
        super().__init__(params, lr=lr, weight_decay=weight_decay, momentum=momentum,
                         nesterov=True, adjust_lr_fn="match_rms_adamw")

    @torch.no_grad()
    def step(self, closure=None):
        from torch.optim._muon import _adjust_lr

        a, b, c = self.defaults["ns_coefficients"]
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - mu)
                update = grad.lerp(buf, mu)  # Nesterov
                x = update.bfloat16() if grad.is_cuda else update.float()
                if x.size(0) > x.size(1):
                    x = x.T
                x = x / x.norm().clamp(min=group["eps"])
                for _ in range(group["ns_steps"]):
                    gram = x @ x.T
                    x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x,
                                    beta=a)
                if update.size(0) > update.size(1):
                    x = x.T
                param.mul_(1 - lr * wd)
                param.add_(x.to(param.dtype),
                           alpha=-_adjust_lr(lr, "match_rms_adamw", param.shape))
        return None


class MuonWithAdamW:
    """Muon and AdamW stepped as one optimizer: the trainer, the fp16 scaler and the
    checkpoint see one object whose `param_groups` are AdamW's, then Muon's.

    `optimizers` is what torch.distributed.checkpoint's state-dict helpers take (a list),
    so the saved state is keyed by parameter names like AdamW's alone."""

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Optimizer):
        self.optimizers = [adamw, muon]
        self.adamw, self.muon = adamw, muon

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {**self.adamw.state, **self.muon.state}

    def step(self, closure=None) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])


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


def set_lr(optimizer: torch.optim.Optimizer | MuonWithAdamW, lr: float) -> None:
    """The schedule's rate on every group (Muon's times its `lr_scale`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
