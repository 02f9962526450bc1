"""The fast decoding step: one new token per sequence through the KV cache with few Python
operations.

`LLM.forward` is general (training, prefill, chunks, recomputation); a decoding step needs
little of it, and at batch 1 on a CPU its per-step Python work (module calls, dropout
identities, RoPE tables rebuilt per step, cache bookkeeping) costs more than the arithmetic.
`FastDecoder` runs the same operations in the same order on the model's own weights:
RoPE tables are computed once for the whole window, the cache is allocated once for every
token the caller will generate, and each layer writes its new row in place. Greedy output
equals the reference path token for token (tests/infer/test_fastpath.py).

It handles the stock blocks (mha / mqa / gqa / mla attention, with or without QK-norm;
MLP or MoE; layer / rms norms; learned, sinusoidal or rotary positions). `supports(model)`
says whether a model is made only of those; anything else uses the reference path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.attention import CausalSelfAttention
from ..model.cache import KVCache
from ..model.mla import MultiHeadLatentAttention
from ..model.mlp import MLP, activate
from ..model.moe import MoE
from ..model.positional import Positions, apply_rope, sinusoidal
from ..model.transformer import LLM, Block, soft_cap

_POS_EMBS = ("learn", "sin", "rope")
_ATTENTION = (CausalSelfAttention, MultiHeadLatentAttention)
_FFN = (MLP, MoE)
_NORMS = (nn.LayerNorm, nn.RMSNorm)


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


class FastDecoder:
    """Prefill once, then `step(token)` -> next logits, for a model with `supports(model)`.

    The cache holds room for `total_tokens` (prompt + tokens to generate, at most
    block_size); `step` may be called while `length < block_size`."""

    def __init__(self, model: LLM, total_tokens: int):
        self.model = model
        self.config = model.config
        self.block_size = model.config.block_size
        self.total_tokens = min(total_tokens, self.block_size)
        self.cache: KVCache | None = None
        device = model.wte.weight.device
        # the position tables of the reference path, for every position at once
        self.positions = Positions(0, self.block_size, device, model.config.rope_theta)
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def length(self) -> int:
        return self.cache.length if self.cache is not None else 0

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) prompt -> (B, V) logits of its last position (the model's own forward)."""
        self.cache = KVCache(len(self.model.blocks), capacity=self.block_size,
                             reserve=self.total_tokens)
        out = self.model(idx, kv_cache=self.cache, last_logits_only=True)
        return out.logits[:, -1]

    def _rope(self, dim: int, at: int) -> tuple[torch.Tensor, torch.Tensor]:
        if dim not in self._tables:
            self._tables[dim] = self.positions.rope(dim)
        cos, sin = self._tables[dim]
        return cos[at:at + 1], sin[at:at + 1]  # (1, dim/2) each

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """(B,) token ids -> (B, V) logits of the next position."""
        model, cfg = self.model, self.config
        at = self.cache.length
        if at >= self.block_size:
            raise ValueError("the cache is full (block_size tokens); crop and prefill again")
        x = F.embedding(token[:, None], model.wte.weight)  # (B, 1, C)
        if model.wpe is not None:
            x = x + model.wpe.weight[at:at + 1]
        elif cfg.pos_emb == "sin":
            x = x + sinusoidal(torch.tensor([at], device=x.device), cfg.n_embd).to(x.dtype)
        for block, layer_cache in zip(model.blocks, self.cache.layers, strict=True):
            h = _norm(block.attn_norm, x)
            if type(block.attn) is CausalSelfAttention:
                x = x + self._attention(block.attn, h, layer_cache, at)
            else:  # MLA: its own forward with a one-position Positions
                x = x + self._mla(block.attn, h, layer_cache, at)
            h = _norm(block.ffn_norm, x)
            ffn = block.ffn
            if type(ffn) is MLP:
                x = x + F.linear(activate(F.linear(h, ffn.up.weight), ffn.non_linearity),
                                 ffn.down.weight)
            else:
                x = x + ffn(h)[0]
        x = _norm(model.norm_f, x)
        logits = F.linear(x, model.lm_head.weight)  # (B, 1, V)
        if cfg.logit_softcap:
            logits = soft_cap(logits, cfg.logit_softcap)
        return logits[:, -1]

    def _attention(self, attn: CausalSelfAttention, h: torch.Tensor, layer_cache,
                   at: int) -> torch.Tensor:
        B = h.shape[0]
        H, hd, kv = attn.n_head, attn.head_dim, attn.n_kv_heads
        C = H * hd
        q, k, v = F.linear(h, attn.qkv.weight).split([C, kv * hd, kv * hd], dim=-1)
        q = q.view(B, 1, H, hd).transpose(1, 2)  # (B, H, 1, hd)
        k = k.view(B, 1, kv, hd).transpose(1, 2)  # (B, Hkv, 1, hd)
        v = v.view(B, 1, kv, hd).transpose(1, 2)
        if attn.q_head_norm is not None:
            q, k = _norm(attn.q_head_norm, q), _norm(attn.k_head_norm, k)
        if attn.rope:
            cos, sin = self._rope(hd, at)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = self._write(layer_cache, at, k, v)  # (B, Hkv, at + 1, hd)
        y = F.scaled_dot_product_attention(q, keys, values, enable_gqa=kv != H)  # (B, H, 1, hd)
        return F.linear(y.transpose(1, 2).reshape(B, 1, C), attn.proj.weight)

    def _mla(self, attn: MultiHeadLatentAttention, h: torch.Tensor, layer_cache,
             at: int) -> torch.Tensor:
        pos = Positions(at, 1, h.device, self.config.rope_theta)
        if attn.rope_dim:  # reuse the window's table instead of rebuilding it each step
            pos._rope[attn.rope_dim] = self._rope(attn.rope_dim, at)
        return attn(h, pos, layer_cache)

    @staticmethod
    def _write(layer_cache, at: int, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write one new row per buffer at `at` (room was reserved); views up to it."""
        if not layer_cache.buffers or at + 1 > layer_cache.allocated:
            return layer_cache.append(*rows)
        for buffer, row in zip(layer_cache.buffers, rows, strict=True):
            buffer[..., at:at + 1, :] = row
        layer_cache.length = at + 1
        return tuple(buffer[..., :at + 1, :] for buffer in layer_cache.buffers)
