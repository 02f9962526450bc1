"""The one scaled-dot-product-attention call every attention kind goes through.

Training uses `F.scaled_dot_product_attention(..., is_causal=True)`, so no (T, T) mask or
score matrix is built (on CPU this holds for dropout 0: torch's CPU flash kernel has no
dropout and falls back to the math path otherwise). Grouped K/V heads go in un-repeated with
`enable_gqa`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float = 0.0,
                     scale: float | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, T, D) against k, v (B, Hkv, L, D) where the T queries are the last T of L.

    L == T (training, first prefill): SDPA's causal kernel. One new query (decoding): it
    sees every key, no mask. Several new queries after a cached prefix: a (T, L) mask.
    """
    T, L = q.shape[-2], k.shape[-2]
    gqa = k.shape[-3] != q.shape[-3]
    if bias is not None:  # an additive (H, T, L) float mask, causal -inf entries included
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                              dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
    if T == L:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                              scale=scale, enable_gqa=gqa)
    mask = None
    if T > 1:
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(diagonal=L - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          scale=scale, enable_gqa=gqa)
