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
from collections.abc import Callable

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
    """RoPE tables for every position of the window, as (block_size, dim) rows: at one
    position x * cos + x[perm] * sin_signed equals apply_rope's rotate-half formula exactly
    (x1 cos - x2 sin, x2 cos + x1 sin: the same products and sums)."""

    def __init__(self, positions: Positions, dim: int, dtype: torch.dtype):
        cos, sin = positions.rope(dim)  # (block_size, dim/2)
        self.cos = torch.cat((cos, cos), dim=-1).to(dtype)  # (block_size, dim)
        self.sin = torch.cat((-sin, sin), dim=-1).to(dtype)
        half = dim // 2
        self.perm = torch.cat((torch.arange(half, dim), torch.arange(half))).to(cos.device)

    def at(self, position: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The rotation at one position, for (..., dim) rows (rows selected once per step)."""
        cos, sin, perm = self.cos[position], self.sin[position], self.perm
        return lambda x: x * cos + x.index_select(-1, perm) * sin


class FastDecoder:
    """Prefill once, then `step(token)` -> next logits, for a model with `supports(model)`.

    The cache holds room for `total_tokens` (prompt + tokens to generate, at most
    block_size); `step` may be called while `length < block_size`. The step works on
    (B, C) rows: one position per sequence. Each layer's weights, norms and head counts
    are looked up once, here, into a `_Layer`; a step only runs arithmetic."""

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
        wt = transposed_weights(model)
        self._layers = [_Layer(self, block, wt) for block in model.blocks]
        self._final_norm = _norm_fn(model.norm_f)
        self._head = wt[id(model.lm_head.weight)]

    @property
    def length(self) -> int:
        return self.cache.length if self.cache is not None else 0

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) prompt -> (B, V) logits of its last position (the model's own forward)."""
        self.cache = KVCache(len(self.model.blocks), capacity=self.block_size,
                             reserve=self.total_tokens)
        out = self.model(idx, kv_cache=self.cache, last_logits_only=True)
        return out.logits[:, -1]

    def rotary(self, dim: int) -> _Rotary:
        if dim not in self._rotary:
            self._rotary[dim] = _Rotary(self.positions, dim, self.model.wte.weight.dtype)
        return self._rotary[dim]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """(B,) token ids -> (B, V) logits of the next position."""
        model, cfg = self.model, self.config
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
        # the rotation of this position, per rotary width (shared by the layers)
        rotations = {dim: rotary.at(at) for dim, rotary in self._rotary.items()}
        for layer, layer_cache in zip(self._layers, self.cache.layers, strict=True):
            x = layer.attend(layer.attn_norm(x), x, layer_cache, at, rotations)
            x = layer.feed_forward(layer.ffn_norm(x), x)
        logits = torch.mm(self._final_norm(x), self._head)  # (B, V)
        if cfg.logit_softcap:
            logits = soft_cap(logits, cfg.logit_softcap)
        return logits


def _norm_fn(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The norm as a function of the rows, with its arguments looked up once."""
    shape, weight, eps = module.normalized_shape, module.weight, module.eps
    if type(module) is nn.LayerNorm:
        bias = module.bias
        return lambda x: F.layer_norm(x, shape, weight, bias, eps)
    return lambda x: F.rms_norm(x, shape, weight, eps)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            scale: torch.Tensor) -> torch.Tensor:
    """(B, H, d) queries of the newest position over (B, Hkv, L, d) keys and
    (B, Hkv, L, dv) values (head h reads KV head h // (H / Hkv)) -> (B, H, dv). `scale`
    is a 0-d fp32 tensor (a Python float costs a conversion per call)."""
    B, H, d = q.shape
    kv, L, dv = keys.shape[1], keys.shape[2], values.shape[-1]
    if q.dtype != torch.float32:  # low precision: SDPA's kernel accumulates in fp32
        y = F.scaled_dot_product_attention(q[:, :, None], keys, values, scale=scale.item(),
                                           enable_gqa=kv != H)
        return y[:, :, 0]
    # the query heads that share each KV head, scaled (fewer numbers than the scores)
    grouped = (q * scale).reshape(B * kv, H // kv, d)
    scores = torch.bmm(grouped, keys.reshape(B * kv, L, d).transpose(1, 2))
    probs = scores.softmax(dim=-1)  # (B * Hkv, H / Hkv, L)
    return torch.bmm(probs, values.reshape(B * kv, L, dv)).view(B, H, dv)


def _write(layer_cache, at: int, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Write one new row per buffer at position `at` (room is there); views up to it.
    Rows are the buffers' shapes without the time axis (dim -2)."""
    for buffer, row in zip(layer_cache.buffers, rows, strict=True):
        buffer.select(-2, at).copy_(row)
    layer_cache.length = at + 1
    return tuple(buffer[..., :at + 1, :] for buffer in layer_cache.buffers)


class _Layer:
    """One block's decoding step: `attend(h, x, ...)` and `feed_forward(h, x)` return x plus
    the sublayer's output for the normed rows h."""

    def __init__(self, decoder: FastDecoder, block: Block, wt: dict[int, torch.Tensor]):
        self.attn_norm, self.ffn_norm = _norm_fn(block.attn_norm), _norm_fn(block.ffn_norm)
        attn, ffn = block.attn, block.ffn
        self.attn, self.ffn = attn, ffn
        if type(attn) is CausalSelfAttention:
            self.attend = self._attention
            self.w_qkv, self.w_proj = wt[id(attn.qkv.weight)], wt[id(attn.proj.weight)]
            self.heads = (attn.n_head, attn.n_kv_heads, attn.head_dim)
            scale = 1.0 / math.sqrt(attn.head_dim)
            self.qk_norms = None if attn.q_head_norm is None else (
                _norm_fn(attn.q_head_norm), _norm_fn(attn.k_head_norm))
            self.rope_dim = attn.head_dim if attn.rope else 0
        else:
            self.attend = self._mla
            self.w_q_down, self.w_q_up = wt[id(attn.q_down.weight)], wt[id(attn.q_up.weight)]
            self.w_kv_down, self.w_proj = wt[id(attn.kv_down.weight)], wt[id(attn.proj.weight)]
            self.q_norm, self.kv_norm = _norm_fn(attn.q_norm), _norm_fn(attn.kv_norm)
            H, hd, lat = attn.n_head, attn.head_dim, attn.kv_latent_dim
            w_uk, w_uv = attn.kv_up.weight.detach().view(2, H, hd, lat)
            # W_uk as (H, hd, lat) and W_uv^T as (H, lat, hd), contiguous
            self.w_uk, self.w_uv_t = w_uk.contiguous(), w_uv.transpose(1, 2).contiguous()
            self.rope_dim = attn.rope_dim
            self.positions_theta = decoder.config.rope_theta
            scale = attn.scale
        # fp32: the value the kernels compute with (SDPA, for other dtypes, takes it as such)
        self.scale = torch.tensor(scale, device=decoder.model.wte.weight.device)
        if self.rope_dim:
            decoder.rotary(self.rope_dim)  # its tables exist before the first step
        if type(ffn) is MLP:  # the residual add rides on the down projection
            self.feed_forward = self._mlp
            self.w_up, self.w_down = wt[id(ffn.up.weight)], wt[id(ffn.down.weight)]
            self.non_linearity = ffn.non_linearity
        else:
            self.feed_forward = self._moe

    def _mlp(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        up = torch.mm(h, self.w_up)
        return torch.addmm(x, activate(up, self.non_linearity), self.w_down)

    def _moe(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(h[:, None])[0][:, 0]

    def _attention(self, h: torch.Tensor, x: torch.Tensor, layer_cache, at: int,
                   rotations: dict) -> torch.Tensor:
        """x + attention of the (B, C) rows h (mha / mqa / gqa)."""
        B = h.shape[0]
        H, kv, hd = self.heads
        qkv = torch.mm(h, self.w_qkv).view(B, H + 2 * kv, hd)
        if self.qk_norms is not None:
            q_norm, k_norm = self.qk_norms
            qk = torch.cat((q_norm(qkv[:, :H]), k_norm(qkv[:, H:H + kv])), dim=1)
        else:
            qk = qkv[:, :H + kv]  # (B, H + kv, hd)
        if self.rope_dim:  # queries and keys rotate by the same angles: one call
            qk = rotations[hd](qk)
        keys, values = _write(layer_cache, at, qk[:, H:], qkv[:, H + kv:])
        y = _attend(qk[:, :H], keys, values, self.scale)  # (B, H, hd)
        return torch.addmm(x, y.reshape(B, H * hd), self.w_proj)

    def _mla(self, h: torch.Tensor, x: torch.Tensor, layer_cache, at: int,
             rotations: dict) -> torch.Tensor:
        """x + MLA of the (B, C) rows h, attending to the cached latents (absorbed)."""
        attn = self.attn
        B = h.shape[0]
        if attn.q_head_norm is not None:  # QK-norm's absorbed form: the module's own path
            pos = Positions(at, 1, h.device, self.positions_theta)
            return x + attn(h[:, None], pos, layer_cache)[:, 0]
        H, hd, r, lat = attn.n_head, attn.head_dim, attn.rope_dim, attn.kv_latent_dim
        q = torch.mm(self.q_norm(torch.mm(h, self.w_q_down)),
                     self.w_q_up).view(B, H, hd + r)  # (B, H, hd + r)
        row = torch.mm(h, self.w_kv_down)  # (B, lat + r): [c | k_rope]
        c = self.kv_norm(row[:, :lat])
        if r:  # the H query parts and the shared key part rotate alike: one call
            rotated = rotations[r](torch.cat((q[..., hd:], row[:, None, lat:]), dim=1))
            q_rope, row = rotated[:, :H], torch.cat((c, rotated[:, H]), dim=-1)
        else:
            row = c
        (latents,) = _write(layer_cache, at, row)  # (B, L, lat + r)
        q_lat = torch.bmm(q[..., :hd].transpose(0, 1), self.w_uk).transpose(0, 1)  # (B, H, lat)
        if r:
            q_lat = torch.cat((q_lat, q_rope), dim=-1)  # (B, H, lat + r)
        # one KV head shared by all: keys are the rows [c, k_rope], values their c part
        o = _attend(q_lat, latents[:, None], latents[:, None, :, :lat], self.scale)
        y = torch.bmm(o.transpose(0, 1), self.w_uv_t).transpose(0, 1)  # (B, H, hd)
        return torch.addmm(x, y.reshape(B, H * hd), self.w_proj)
