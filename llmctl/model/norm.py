"""Normalization layers: `layer` (LayerNorm) or `rms` (RMSNorm)."""

from __future__ import annotations

from torch import nn

NORM_EPS = 1e-5


def make_norm(kind: str, dim: int, eps: float = NORM_EPS) -> nn.Module:
    """A LayerNorm (weight + bias) or an RMSNorm (weight only) over the last `dim` features."""
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rms":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r} (expected 'layer' or 'rms')")
