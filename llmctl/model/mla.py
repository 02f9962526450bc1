"""Multi-head latent attention (DeepSeek-V2).

Queries come from a low-rank latent: q = W_uq · norm(W_dq · x). Keys and values come from
one joint latent c = norm(W_dkv · x) of `kv_latent_dim` numbers per token:
k_h = W_uk,h · c, v_h = W_uv,h · c. With RoPE, position enters only through decoupled
parts of `rope_head_dim`: a rotary query per head (from the query latent) and one rotary key
shared by all heads (from x); the score of head h is
(q_h · k_h + q_rope,h · k_rope) / sqrt(head_dim + rope_head_dim). Without RoPE (learn / sin
positions) it is plain latent attention; with ALiBi, plain latent attention plus the
distance biases.

Training decompresses per-head K/V and runs SDPA. Generation caches only [c, k_rope]
(kv_latent_dim + rope_head_dim numbers per token) and absorbs W_uk into the query and W_uv
into the output, so attention runs directly against the cached latents as one shared KV head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config.schema import BlockConfig
from .cache import LayerCache
from .norm import NORM_EPS, make_norm
from .positional import Positions, apply_rope
from .sdpa import causal_attention


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, block: BlockConfig, *, n_embd: int, dropout: float, pos_emb: str,
                 norm: str):
        super().__init__()
        rope = pos_emb == "rope"
        if block.q_latent_dim is None or block.kv_latent_dim is None:
            raise ValueError("mla needs q_latent_dim and kv_latent_dim")
        if rope and not block.rope_head_dim:
            raise ValueError("mla with rope needs rope_head_dim")
        self.n_head = block.n_head
        self.head_dim = n_embd // block.n_head
        self.kv_latent_dim = block.kv_latent_dim
        self.rope_dim = block.rope_head_dim if rope else 0
        self.dropout = dropout
        self.alibi = pos_emb == "alibi"  # biases on the scores; no rotary part (rope_dim 0)
        H, hd, r = self.n_head, self.head_dim, self.rope_dim
        self.q_down = nn.Linear(n_embd, block.q_latent_dim, bias=False)
        self.q_norm = make_norm(norm, block.q_latent_dim, block.latent_norm_eps)
        self.q_up = nn.Linear(block.q_latent_dim, H * (hd + r), bias=False)
        self.kv_down = nn.Linear(n_embd, self.kv_latent_dim + r, bias=False)  # [c | k_rope]
        self.kv_norm = make_norm(norm, self.kv_latent_dim, block.latent_norm_eps)
        self.kv_up = nn.Linear(self.kv_latent_dim, 2 * H * hd, bias=False)  # [k_nope | v]
        self.proj = nn.Linear(H * hd, n_embd, bias=False)
        self.proj.weight.residual_out = True  # GPT-2 scaled init
        self.resid_drop = nn.Dropout(dropout)
        # QK-norm over each head's whole query / key [nope | rope] (gains shared by the heads)
        self.q_head_norm = nn.RMSNorm(hd + r, eps=NORM_EPS) if block.qk_norm else None
        self.k_head_norm = nn.RMSNorm(hd + r, eps=NORM_EPS) if block.qk_norm else None

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim + self.rope_dim)

    def forward(self, x: torch.Tensor, pos: Positions,
                cache: LayerCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, hd, r = self.n_head, self.head_dim, self.rope_dim
        q = self.q_up(self.q_norm(self.q_down(x)))  # (B, T, H * (hd + r))
        q = q.view(B, T, H, hd + r).transpose(1, 2)  # (B, H, T, hd + r)
        c, k_rope = self.kv_down(x).split([self.kv_latent_dim, r], dim=-1)
        c = self.kv_norm(c)  # (B, T, kv_latent)
        if self.q_head_norm is not None:
            q = self.q_head_norm(q)  # (B, H, T, hd + r), before RoPE as in the other kinds
        if r:
            cos, sin = pos.rope(r)
            q_nope, q_rope = q.split([hd, r], dim=-1)
            q = torch.cat((q_nope, apply_rope(q_rope, cos, sin)), dim=-1)
        dropout_p = self.dropout if self.training else 0.0
        bias = None  # ALiBi: (H, T, L) over the L keys this call attends to
        if self.alibi:
            bias = pos.alibi(H, T + (cache.length if cache is not None else 0))
        if self.k_head_norm is not None:
            y = self._qk_normed(q, c, k_rope, pos, cache, dropout_p, bias)
        else:
            if r:
                k_rope = apply_rope(k_rope, cos, sin)  # (B, T, r)
            if cache is None:
                y = self._decompressed(q, c, k_rope, dropout_p, bias)
            else:
                y = self._absorbed(q, c, k_rope, cache, dropout_p, bias)
        y = y.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, H * hd)
        return self.resid_drop(self.proj(y))

    def _decompressed(self, q: torch.Tensor, c: torch.Tensor, k_rope: torch.Tensor,
                      dropout_p: float, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Training path: per-head K/V from the latent, one causal SDPA call."""
        B, T, _ = c.shape
        H, hd, r = self.n_head, self.head_dim, self.rope_dim
        k, v = self.kv_up(c).view(B, T, 2, H, hd).permute(2, 0, 3, 1, 4)  # (B, H, T, hd) each
        if r:
            k = torch.cat((k, k_rope[:, None].expand(B, H, T, r)), dim=-1)  # (B, H, T, hd + r)
            # SDPA's fused CPU kernel wants equal q/k/v widths; zero columns change nothing.
            v = F.pad(v, (0, r))
        y = causal_attention(q, k, v, dropout_p=dropout_p, scale=self.scale, bias=bias)
        return y[..., :hd]  # (B, H, T, hd)

    def _absorbed(self, q: torch.Tensor, c: torch.Tensor, k_rope: torch.Tensor,
                  cache: LayerCache, dropout_p: float,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        """Generation path: attend to cached [c, k_rope] with W_uk / W_uv absorbed."""
        H, hd, r, lat = self.n_head, self.head_dim, self.rope_dim, self.kv_latent_dim
        (latents,) = cache.append(torch.cat((c, k_rope), dim=-1))  # (B, L, lat + r)
        w_uk, w_uv = self.kv_up.weight.view(2, H, hd, lat).to(q.dtype)  # (H, hd, lat) each
        q_nope, q_rope = q.split([hd, r], dim=-1)
        q_lat = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)  # (B, H, T, lat)
        q = torch.cat((q_lat, q_rope), dim=-1)  # (B, H, T, lat + r)
        kv = latents[:, None].to(q.dtype)  # (B, 1, L, lat + r): one KV head shared by all
        # Values are the latent c; using the whole [c, k_rope] row keeps widths equal for the
        # fused kernel and the extra r output columns are dropped.
        o = causal_attention(q, kv, kv, dropout_p=dropout_p, scale=self.scale,
                             bias=bias)[..., :lat]
        return torch.einsum("bhtc,hdc->bhtd", o, w_uv)  # (B, H, T, hd)

    def _qk_normed(self, q: torch.Tensor, c: torch.Tensor, k_rope: torch.Tensor, pos: Positions,
                   cache: LayerCache | None, dropout_p: float,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
        """QK-norm paths (`bias`: ALiBi's additive (H, T, L) mask, causal entries included).
        k_rope arrives un-rotated: the key norm covers [k_nope_h | k_rope].

        Absorbed, a head's normalised key is g * [W_uk,h c, k_rope] * s_h with the scalar
        s_h = 1 / rms(key_h): the gain g moves into the query and s_h (one number per head
        and token, cached next to the latent) scales the score, so the cache still holds no
        per-head keys."""
        B, T, _ = c.shape
        H, hd, r, lat = self.n_head, self.head_dim, self.rope_dim, self.kv_latent_dim
        gain = self.k_head_norm.weight
        if cache is None:  # decompressed: per-head keys, normalised, then rotated
            k, v = self.kv_up(c).view(B, T, 2, H, hd).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
            if r:
                k = torch.cat((k, k_rope[:, None].expand(B, H, T, r)), dim=-1)
            k = self.k_head_norm(k)  # (B, H, T, hd + r)
            if r:
                cos, sin = pos.rope(r)
                k = torch.cat((k[..., :hd], apply_rope(k[..., hd:], cos, sin)), dim=-1)
                v = F.pad(v, (0, r))
            y = causal_attention(q, k, v, dropout_p=dropout_p, scale=self.scale, bias=bias)
            return y[..., :hd]  # (B, H, T, hd)
        w_uk, w_uv = self.kv_up.weight.view(2, H, hd, lat).to(q.dtype)  # (H, hd, lat) each
        k_nope = torch.einsum("btc,hdc->bhtd", c, w_uk)  # (B, H, T, hd): new tokens only
        square_sum = k_nope.square().sum(-1)  # (B, H, T)
        if r:
            square_sum = square_sum + k_rope.square().sum(-1)[:, None]
            cos, sin = pos.rope(r)
            k_rope = apply_rope(k_rope * gain[hd:].to(k_rope.dtype), cos, sin)  # (B, T, r)
        inv_rms = torch.rsqrt(square_sum / (hd + r) + NORM_EPS)  # (B, H, T)
        latents, key_scale = cache.append(torch.cat((c, k_rope), dim=-1),
                                          inv_rms.transpose(1, 2))  # (B, L, lat + r), (B, L, H)
        q_nope, q_rope = q.split([hd, r], dim=-1)
        q_lat = torch.einsum("bhtd,hdc->bhtc", q_nope * gain[:hd].to(q.dtype), w_uk)
        q = torch.cat((q_lat, q_rope), dim=-1)  # (B, H, T, lat + r)
        latents = latents.to(q.dtype)
        scores = q @ latents[:, None].transpose(-1, -2)  # (B, H, T, L)
        scores = scores * (key_scale.transpose(1, 2)[:, :, None, :].to(q.dtype) * self.scale)
        L = latents.shape[1]
        if bias is not None:
            scores = scores + bias.to(scores.dtype)  # (B, H, T, L)
        if T > 1:  # the T new queries are the last T of L
            visible = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(diagonal=L - T)
            scores = scores.masked_fill(~visible, float("-inf"))
        weights = F.dropout(scores.softmax(dim=-1), dropout_p)
        o = weights @ latents[:, None, :, :lat]  # (B, H, T, lat)
        return torch.einsum("bhtc,hdc->bhtd", o, w_uv)  # (B, H, T, hd)
