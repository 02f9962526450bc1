"""Position information: sinusoidal absolute embeddings and rotary embeddings (RoPE).

Tables are computed per forward pass from the positions actually used (cheap next to the
matmuls), so there are no buffers to cast, move or rebuild on the meta device.
"""

from __future__ import annotations

import math

import torch


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sin/cos embeddings: (T,) positions -> (T, dim) float32."""
    half = (dim + 1) // 2
    freqs = torch.exp(torch.arange(half, device=positions.device, dtype=torch.float32)
                      * (-math.log(10000.0) * 2 / dim))
    angles = positions.float()[:, None] * freqs[None, :]  # (T, half)
    table = torch.empty(positions.shape[0], dim, device=positions.device)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)[:, : dim // 2]
    return table


class Positions:
    """Which positions a forward pass covers: `start .. start + length - 1`.

    RoPE tables are built lazily per rotary dimension and shared by every layer using it.
    """

    def __init__(self, start: int, length: int, device: torch.device, rope_theta: float):
        self.start = start
        self.length = length
        self.device = device
        self.rope_theta = rope_theta
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def ids(self) -> torch.Tensor:
        return torch.arange(self.start, self.start + self.length, device=self.device)

    def rope(self, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (T, dim // 2) float32, for rotating features in pairs (i, i + dim/2)."""
        if dim not in self._rope:
            inv_freq = self.rope_theta ** (
                -torch.arange(0, dim, 2, device=self.device, dtype=torch.float32) / dim)
            angles = self.ids.float()[:, None] * inv_freq[None, :]  # (T, dim/2)
            self._rope[dim] = (torch.cos(angles), torch.sin(angles))
        return self._rope[dim]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (..., T, dim) features by position (rotate-half layout, as in GPT-NeoX/Llama)."""
    x1, x2 = x.chunk(2, dim=-1)  # (..., T, dim/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
