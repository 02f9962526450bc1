"""Normalization layers: `layer` (LayerNorm) or `rms` (RMSNorm)."""

from __future__ import annotations

from torch import nn

NORM_EPS = 1e-5


def make_norm(kind: str, dim: int) -> nn.Module:
    """A LayerNorm (weight + bias) or an RMSNorm (weight only) over the last `dim` features."""
    if kind == "layer":
        return nn.LayerNorm(dim, eps=NORM_EPS)
    if kind == "rms":
        return nn.RMSNorm(dim, eps=NORM_EPS)
    raise ValueError(f"unknown norm {kind!r} (expected 'layer' or 'rms')")
