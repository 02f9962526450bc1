"""Causal self-attention for mha / mqa / gqa (one class parameterised by the number of KV
heads), and the registry mapping an attention kind to its class."""

from __future__ import annotations

import torch
from torch import nn

from ..config.schema import BlockConfig
from .cache import LayerCache
from .mla import MultiHeadLatentAttention
from .norm import NORM_EPS
from .positional import Positions, apply_rope
from .sdpa import causal_attention


class CausalSelfAttention(nn.Module):
    """Multi-head attention with `kv_heads` key/value heads: mha (= n_head), mqa (1), gqa."""

    def __init__(self, block: BlockConfig, *, n_embd: int, dropout: float, pos_emb: str,
                 norm: str):
        super().__init__()
        rope = pos_emb == "rope"
        self.n_head = block.n_head
        self.n_kv_heads = block.kv_heads
        self.head_dim = n_embd // block.n_head
        self.rope = rope
        self.alibi = pos_emb == "alibi"
        self.dropout = dropout
        kv_dim = self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(n_embd, n_embd + 2 * kv_dim, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.proj.weight.residual_out = True  # GPT-2 scaled init
        self.resid_drop = nn.Dropout(dropout)
        # QK-norm: per-head RMSNorm of queries and keys (gains shared by the heads)
        self.q_head_norm = nn.RMSNorm(self.head_dim, eps=NORM_EPS) if block.qk_norm else None
        self.k_head_norm = nn.RMSNorm(self.head_dim, eps=NORM_EPS) if block.qk_norm else None

    def forward(self, x: torch.Tensor, pos: Positions,
                cache: LayerCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        hd, kv = self.head_dim, self.n_kv_heads
        q, k, v = self.qkv(x).split([C, kv * hd, kv * hd], dim=-1)
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, kv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, kv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        if self.q_head_norm is not None:
            q, k = self.q_head_norm(q), self.k_head_norm(k)
        if self.rope:
            cos, sin = pos.rope(hd)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, Hkv, L, hd)
        bias = pos.alibi(self.n_head, k.shape[-2]) if self.alibi else None  # (H, T, L)
        y = causal_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                             bias=bias)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y))


ATTENTION_CLASSES: dict[str, type[nn.Module]] = {
    "mha": CausalSelfAttention,
    "mqa": CausalSelfAttention,
    "gqa": CausalSelfAttention,
    "mla": MultiHeadLatentAttention,
}


def build_attention(block: BlockConfig, *, n_embd: int, dropout: float, pos_emb: str,
                    norm: str) -> nn.Module:
    """The attention module for one block, by its kind (every class takes the same
    arguments; MLA uses `norm` for its latent norms)."""
    cls = ATTENTION_CLASSES.get(block.attn)
    if cls is None:
        raise ValueError(f"unknown attention kind {block.attn!r} "
                         f"(expected one of {', '.join(ATTENTION_CLASSES)})")
    return cls(block, n_embd=n_embd, dropout=dropout, pos_emb=pos_emb, norm=norm)
