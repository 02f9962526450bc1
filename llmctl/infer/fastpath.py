"""The fast decoding step: one new token per sequence through the KV cache with few
operations.

`LLM.forward` is general (training, prefill, chunks, recomputation); a decoding step needs
little of it. At batch 1 on a CPU a step is matrix-vector products, bound by how fast the
weights stream from memory, plus some 30 small operations per layer whose dispatch costs
more than their arithmetic. `FastDecoder` runs the same arithmetic on the model's weights
with fewer, cheaper operations:

- the step works on (B, C) rows; residual adds ride on the output projections (`addmm`);
- on a CPU the projection weights are read from an (in, out) contiguous copy made once per
  decoder (MKL's matrix-vector product streams that layout ~1.3x faster; no copy when it
  would take more than a quarter of the free memory);
- RoPE tables are built once for the window, and queries and keys rotate together in three
  elementwise operations (exactly apply_rope's products and sums);
- the one new query attends with two batched products and a softmax, grouped by KV head
  for mqa / gqa (SDPA's setup costs more than the work at one query); MLA attends to its
  cached latents with W_uk and W_uv absorbed;
- the cache is allocated once for every token the caller will generate, and each layer
  writes its new row in place.

Greedy output equals the reference path token for token and the logits agree to float
rounding (tests/infer/test_fastpath.py). It handles the stock blocks (mha / mqa / gqa / mla
attention, with or without QK-norm; MLP or MoE; layer / rms norms; learned, sinusoidal or
rotary positions). `supports(model)` says whether a model is made only of those; anything
else uses the reference path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..model.attention import CausalSelfAttention
from ..model.cache import KVCache
from ..model.mla import MultiHeadLatentAttention
from ..model.mlp import MLP, activate
from ..model.moe import MoE
from ..model.positional import Positions, sinusoidal
from ..model.transformer import LLM, Block, soft_cap
from ..runtime.device import available_memory

_POS_EMBS = ("learn", "sin", "rope")
_ATTENTION = (CausalSelfAttention, MultiHeadLatentAttention)
_FFN = (MLP, MoE)
_NORMS = (nn.LayerNorm, nn.RMSNorm)
# column-major copies only while they take at most this share of the free memory
_LAYOUT_MEMORY_SHARE = 0.25


def supports(model: nn.Module) -> bool:
    """True for a model made only of blocks the fast step knows (else: the reference path)."""
    if type(model) is not LLM or model.config.pos_emb not in _POS_EMBS:
        return False
    if type(model.norm_f) not in _NORMS:
        return False
    return all(type(b) is Block and type(b.attn) in _ATTENTION and type(b.ffn) in _FFN
               and type(b.attn_norm) in _NORMS and type(b.ffn_norm) in _NORMS
               for b in model.blocks)


def _norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(module) is nn.LayerNorm:
        return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
    return F.rms_norm(x, module.normalized_shape, module.weight, module.eps)


def _projection_weights(model: LLM) -> list[torch.Tensor]:
    """The 2-D weights the decoding step multiplies by (not the embedding tables)."""
    weights = [model.lm_head.weight]
    for block in model.blocks:
        attn, ffn = block.attn, block.ffn
        if type(attn) is CausalSelfAttention:
            weights += [attn.qkv.weight, attn.proj.weight]
        else:
            weights += [attn.q_down.weight, attn.q_up.weight, attn.kv_down.weight,
                        attn.proj.weight]
        if type(ffn) is MLP:
            weights += [ffn.up.weight, ffn.down.weight]
    return weights


def transposed_weights(model: LLM) -> dict[int, torch.Tensor]:
    """{id(weight): weight^T as an (in, out) tensor} for every projection of the step: a
    contiguous copy on a CPU with fp32 / fp64 weights when it fits in memory (MKL's
    matrix-vector product reads that layout faster), else the transposed view."""
    weights = {id(w): w.detach() for w in _projection_weights(model)}
    copy = all(w.device.type == "cpu" and w.dtype in (torch.float32, torch.float64)
               for w in weights.values())
    if copy:
        need = sum(w.numel() * w.element_size() for w in weights.values())
        free, _ = available_memory(next(iter(weights.values())).device)
        copy = free is None or need <= _LAYOUT_MEMORY_SHARE * free
    return {key: w.t().contiguous() if copy else w.t() for key, w in weights.items()}


class _Rotary:
    """RoPE at one position as three elementwise operations on (..., dim) rows:
    x * cos + x[perm] * sin_signed equals apply_rope's rotate-half formula exactly
    (x1 cos - x2 sin, x2 cos + x1 sin: the same products and sums)."""

    def __init__(self, positions: Positions, dim: int, dtype: torch.dtype):
        cos, sin = positions.rope(dim)  # (block_size, dim/2)
        self.cos = torch.cat((cos, cos), dim=-1).to(dtype)  # (block_size, dim)
        self.sin = torch.cat((-sin, sin), dim=-1).to(dtype)
        half = dim // 2
        self.perm = torch.cat((torch.arange(half, dim), torch.arange(half))).to(cos.device)

    def __call__(self, x: torch.Tensor, at: int) -> torch.Tensor:
        return x * self.cos[at] + x.index_select(-1, self.perm) * self.sin[at]


class FastDecoder:
    """Prefill once, then `step(token)` -> next logits, for a model with `supports(model)`.

    The cache holds room for `total_tokens` (prompt + tokens to generate, at most
    block_size); `step` may be called while `length < block_size`. The step works on
    (B, C) rows: one position per sequence."""

    def __init__(self, model: LLM, total_tokens: int):
        self.model = model
        self.config = model.config
        self.block_size = model.config.block_size
        self.total_tokens = min(total_tokens, self.block_size)
        self.cache: KVCache | None = None
        weight = model.wte.weight
        # the position tables of the reference path, for every position at once
        self.positions = Positions(0, self.block_size, weight.device, model.config.rope_theta)
        self._rotary: dict[int, _Rotary] = {}
        self._wt = transposed_weights(model)
        self._absorbed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def length(self) -> int:
        return self.cache.length if self.cache is not None else 0

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) prompt -> (B, V) logits of its last position (the model's own forward)."""
        self.cache = KVCache(len(self.model.blocks), capacity=self.block_size,
                             reserve=self.total_tokens)
        out = self.model(idx, kv_cache=self.cache, last_logits_only=True)
        return out.logits[:, -1]

    def _rope(self, dim: int) -> _Rotary:
        if dim not in self._rotary:
            self._rotary[dim] = _Rotary(self.positions, dim, self.model.wte.weight.dtype)
        return self._rotary[dim]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """(B,) token ids -> (B, V) logits of the next position."""
        model, cfg, wt = self.model, self.config, self._wt
        at = self.cache.length
        if at >= self.block_size:
            raise ValueError("the cache is full (block_size tokens); crop and prefill again")
        for layer_cache in self.cache.layers:
            if at + 1 > layer_cache.allocated:  # no room reserved: grow as the model would
                layer_cache._grow(tuple(layer_cache.buffers), at + 1)
        x = F.embedding(token, model.wte.weight)  # (B, C)
        if model.wpe is not None:
            x = x + model.wpe.weight[at]
        elif cfg.pos_emb == "sin":
            x = x + sinusoidal(torch.tensor([at], device=x.device), cfg.n_embd).to(x.dtype)
        for block, layer_cache in zip(model.blocks, self.cache.layers, strict=True):
            h = _norm(block.attn_norm, x)
            if type(block.attn) is CausalSelfAttention:
                x = self._attention(block.attn, h, x, layer_cache, at)
            else:
                x = self._mla(block.attn, h, x, layer_cache, at)
            h = _norm(block.ffn_norm, x)
            ffn = block.ffn
            if type(ffn) is MLP:  # the residual add rides on the down projection
                up = torch.mm(h, wt[id(ffn.up.weight)])
                x = torch.addmm(x, activate(up, ffn.non_linearity), wt[id(ffn.down.weight)])
            else:
                x = x + ffn(h[:, None])[0][:, 0]
        x = _norm(model.norm_f, x)
        logits = torch.mm(x, wt[id(model.lm_head.weight)])  # (B, V)
        if cfg.logit_softcap:
            logits = soft_cap(logits, cfg.logit_softcap)
        return logits

    def _attention(self, attn: CausalSelfAttention, h: torch.Tensor, x: torch.Tensor,
                   layer_cache, at: int) -> torch.Tensor:
        """x + attention of the (B, C) rows h (mha / mqa / gqa)."""
        B = h.shape[0]
        H, hd, kv = attn.n_head, attn.head_dim, attn.n_kv_heads
        qkv = torch.mm(h, self._wt[id(attn.qkv.weight)]).view(B, H + 2 * kv, hd)
        if attn.q_head_norm is not None:
            qk = torch.cat((_norm(attn.q_head_norm, qkv[:, :H]),
                            _norm(attn.k_head_norm, qkv[:, H:H + kv])), dim=1)
        else:
            qk = qkv[:, :H + kv]  # (B, H + kv, hd)
        if attn.rope:  # queries and keys rotate by the same angles: one call
            qk = self._rope(hd)(qk, at)
        keys, values = self._write(layer_cache, at, qk[:, H:], qkv[:, H + kv:])
        y = self._attend(qk[:, :H], keys, values, 1.0 / math.sqrt(hd))  # (B, H, hd)
        return torch.addmm(x, y.reshape(B, H * hd), self._wt[id(attn.proj.weight)])

    @staticmethod
    def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                scale: float) -> torch.Tensor:
        """(B, H, d) queries of the newest position over (B, Hkv, L, d) keys and
        (B, Hkv, L, dv) values (head h reads KV head h // (H / Hkv)) -> (B, H, dv)."""
        B, H, d = q.shape
        kv, L, dv = keys.shape[1], keys.shape[2], values.shape[-1]
        if q.dtype != torch.float32:  # low precision: SDPA's kernel accumulates in fp32
            y = F.scaled_dot_product_attention(q[:, :, None], keys, values, scale=scale,
                                               enable_gqa=kv != H)
            return y[:, :, 0]
        # the query heads that share each KV head, scaled (fewer numbers than the scores)
        grouped = (q * scale).reshape(B * kv, H // kv, d)
        scores = torch.bmm(grouped, keys.reshape(B * kv, L, d).transpose(1, 2))
        probs = scores.softmax(dim=-1)  # (B * Hkv, H / Hkv, L)
        return torch.bmm(probs, values.reshape(B * kv, L, dv)).view(B, H, dv)

    def _mla(self, attn: MultiHeadLatentAttention, h: torch.Tensor, x: torch.Tensor,
             layer_cache, at: int) -> torch.Tensor:
        """x + MLA of the (B, C) rows h, attending to the cached latents (absorbed)."""
        B = h.shape[0]
        if attn.q_head_norm is not None:  # QK-norm's absorbed form: the module's own path
            pos = Positions(at, 1, h.device, self.config.rope_theta)
            return x + attn(h[:, None], pos, layer_cache)[:, 0]
        H, hd, r, lat = attn.n_head, attn.head_dim, attn.rope_dim, attn.kv_latent_dim
        wt = self._wt
        q = torch.mm(_norm(attn.q_norm, torch.mm(h, wt[id(attn.q_down.weight)])),
                     wt[id(attn.q_up.weight)]).view(B, H, hd + r)  # (B, H, hd + r)
        row = torch.mm(h, wt[id(attn.kv_down.weight)])  # (B, lat + r): [c | k_rope]
        c = _norm(attn.kv_norm, row[:, :lat])
        if r:  # the H query parts and the shared key part rotate alike: one call
            rotated = self._rope(r)(torch.cat((q[..., hd:], row[:, None, lat:]), dim=1), at)
            q_rope, row = rotated[:, :H], torch.cat((c, rotated[:, H]), dim=-1)
        else:
            row = c
        (latents,) = self._write(layer_cache, at, row)  # (B, L, lat + r)
        w_uk, w_uv_t = self._absorbed_weights(attn)
        q_lat = torch.bmm(q[..., :hd].transpose(0, 1), w_uk).transpose(0, 1)  # (B, H, lat)
        if r:
            q_lat = torch.cat((q_lat, q_rope), dim=-1)  # (B, H, lat + r)
        # one KV head shared by all: keys are the rows [c, k_rope], values their c part
        o = self._attend(q_lat, latents[:, None], latents[:, None, :, :lat], attn.scale)
        y = torch.bmm(o.transpose(0, 1), w_uv_t).transpose(0, 1)  # (B, H, hd)
        return torch.addmm(x, y.reshape(B, H * hd), wt[id(attn.proj.weight)])

    def _absorbed_weights(self, attn: MultiHeadLatentAttention
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """W_uk as (H, hd, lat) and W_uv^T as (H, lat, hd), contiguous, made once."""
        key = id(attn)
        if key not in self._absorbed:
            H, hd, lat = attn.n_head, attn.head_dim, attn.kv_latent_dim
            w_uk, w_uv = attn.kv_up.weight.detach().view(2, H, hd, lat)
            self._absorbed[key] = (w_uk.contiguous(), w_uv.transpose(1, 2).contiguous())
        return self._absorbed[key]

    @staticmethod
    def _write(layer_cache, at: int, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write one new row per buffer at position `at` (room is there); views up to it.
        Rows are the buffers' shapes without the time axis (dim -2)."""
        for buffer, row in zip(layer_cache.buffers, rows, strict=True):
            buffer.select(-2, at).copy_(row)
        layer_cache.length = at + 1
        return tuple(buffer[..., :at + 1, :] for buffer in layer_cache.buffers)
