"""Position information: sinusoidal absolute embeddings, rotary embeddings (RoPE) and ALiBi
distance biases.

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
        self._rope: dict = {}  # RoPE tables by dim, ALiBi biases by ("alibi", H, L)

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


    def alibi(self, n_head: int, kv_length: int) -> torch.Tensor:
        """ALiBi's additive attention bias (n_head, T, kv_length), float32, causal mask included.

        The T queries are the last T of the kv_length keys, so only distances matter: the
        same bias holds after a sliding cache has dropped its oldest tokens."""
        key = ("alibi", n_head, kv_length)
        if key not in self._rope:
            self._rope[key] = alibi_bias(alibi_slopes(n_head).to(self.device), self.length,
                                         kv_length)
        return self._rope[key]


def alibi_slopes(n_head: int) -> torch.Tensor:
    """The ALiBi paper's head slopes: 2^(-8/n), 2^(-16/n), ... for n a power of two; otherwise
    those of the nearest lower power of two, then every other slope of the next one."""
    def powers(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    slopes = powers(closest)
    if closest < n_head:
        slopes += powers(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, T: int, L: int) -> torch.Tensor:
    """-slope_h * (i - j) for query i (the last T of L positions) and key j <= i; -inf for
    j > i. (H,) slopes -> (H, T, L) float32."""
    q_pos = torch.arange(L - T, L, device=slopes.device)[:, None]  # (T, 1)
    k_pos = torch.arange(L, device=slopes.device)[None, :]  # (1, L)
    distance = (q_pos - k_pos).float()  # (T, L)
    bias = -slopes[:, None, None] * distance  # (H, T, L)
    return bias.masked_fill(distance < 0, float("-inf"))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (..., T, dim) features by position (rotate-half layout, as in GPT-NeoX/Llama)."""
    x1, x2 = x.chunk(2, dim=-1)  # (..., T, dim/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
