"""Feed-forward network and the activation functions named by `non_linearity`.

Gated kinds (glu, swiglu, geglu, reglu) project to 2 * hidden features: a gate half that
goes through the activation and a value half it multiplies (gate first).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config.schema import GATED_NON_LINEARITIES


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "relu2": _relu2,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "selu": F.selu,
    "celu": F.celu,
    "elu": F.elu,
    "lrelu": lambda x: F.leaky_relu(x, 0.01),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    # gated: the function applied to the gate half
    "glu": torch.sigmoid,
    "swiglu": F.silu,
    "geglu": F.gelu,
    "reglu": F.relu,
}


def is_gated(non_linearity: str) -> bool:
    return non_linearity in GATED_NON_LINEARITIES


def up_features(hidden: int, non_linearity: str) -> int:
    """Width of the input projection: 2 * hidden for gated activations."""
    return 2 * hidden if is_gated(non_linearity) else hidden


def activate(h: torch.Tensor, non_linearity: str) -> torch.Tensor:
    """(..., up_features) -> (..., hidden)."""
    fn = ACTIVATIONS[non_linearity]
    if is_gated(non_linearity):
        gate, value = h.chunk(2, dim=-1)
        return fn(gate) * value
    return fn(h)


class MLP(nn.Module):
    """Linear up -> activation -> linear down -> dropout."""

    def __init__(self, n_embd: int, hidden: int, non_linearity: str, dropout: float = 0.0):
        super().__init__()
        if non_linearity not in ACTIVATIONS:
            raise ValueError(f"unknown non_linearity {non_linearity!r}")
        self.non_linearity = non_linearity
        self.up = nn.Linear(n_embd, up_features(hidden, non_linearity), bias=False)
        self.down = nn.Linear(hidden, n_embd, bias=False)
        self.down.weight.residual_out = True  # GPT-2 scaled init
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = activate(self.up(x), self.non_linearity)  # (..., hidden)
        return self.drop(self.down(h))  # (..., n_embd)
