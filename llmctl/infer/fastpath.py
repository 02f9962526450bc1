"""The fast decoding step: one new token per sequence through the KV cache with few
operations.

`LLM.forward` is general (training, prefill, chunks, recomputation); a decoding step needs
little of it. At batch 1 on a CPU a step is matrix-vector products, bound by how fast the
weights stream from memory, plus some 30 small operations per layer whose dispatch costs
more than their arithmetic. `FastDecoder` runs the same arithmetic on the model's weights
with fewer, cheaper operations:

- the step works on (B, C) rows; residual adds ride on the output projections, in place
  (`addmm_`: the residual row is not copied first);
- on a CPU a projection whose output is at least as wide as its input is read from an
  (in, out) contiguous copy made once per decoder (`weight_layout`: MKL streams that layout
  faster there; down projections stay as they are); the head's copy is made on first use,
  as steps that go through its int8 screen never multiply by all of it. Where the step owns
  the query weights' copy (CPU, fp32 / fp64) the softmax scale is folded into it;
- RoPE tables are built once for the window, and queries and keys rotate together in three
  elementwise operations (exactly apply_rope's products and sums);
- the one new query attends with two batched products and a softmax, grouped by KV head
  for mqa / gqa (SDPA's setup costs more than the work at one query), reading keys and
  values through views of the cache made once per decoder;
- MLA takes its query and key latents from one product (W_dq and W_dkv side by side) and
  attends to its cached latents with W_uk and W_uv absorbed; W_uk is absorbed into the
  query's up-projection itself where the step owns its weights and the merged matrix is not
  much larger than the two it replaces;
- the cache is allocated once for every token the caller will generate, and each layer
  writes its new row in place;
- a greedy step (`greedy_step`) picks its token through an int8 screen of the head that
  reads only the fp32 columns that could win (`greedy_head.ScreenedArgmax`): the head is the
  largest matrix of a small model, and a quarter of its bytes keeps the step's weights in
  the CPU's cache; a sampled step (`sampled_step`) draws through the same screen
  (`sampled_head.ScreenedSampler`): top-k from the exact logits of only the tokens that can
  reach the top k, untruncated by rejection, reading the rows of a few proposed tokens.

Greedy output equals the reference path token for token and the logits agree to float
rounding (tests/infer/test_fastpath.py); so does seeded top-k sampling, while untruncated
sampling at one row follows the same distribution with other random numbers
(tests/infer/test_sampled_head.py). It handles the stock blocks (mha / mqa / gqa / mla
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
from ..model.cache import KVCache, LayerCache
from ..model.mla import MultiHeadLatentAttention
from ..model.mlp import MLP, activate
from ..model.moe import MoE
from ..model.positional import Positions, sinusoidal
from ..model.transformer import LLM, Block
from .greedy_head import ScreenedArgmax, full_argmax, head_logits
from .sampled_head import ScreenedSampler
from .sampling import mask_padding, sample_next, truncates_top_p
from .weight_layout import copied, owns_copies, transposed, transposed_weights

_POS_EMBS = ("learn", "sin", "rope")
_ATTENTION = (CausalSelfAttention, MultiHeadLatentAttention)
_FFN = (MLP, MoE)
_NORMS = (nn.LayerNorm, nn.RMSNorm)
# MLA: W_uk is merged into the query up-projection while the merged matrix holds at most this
# many numbers more than the two it replaces (about what the operations it saves cost, in
# time, to stream from memory)
_ABSORB_SLACK = 1 << 16
_UNBUILT = object()  # a decoder's head screen before its first greedy step


def supports(model: nn.Module) -> bool:
    """True for a model made only of blocks the fast step knows (else: the reference path)."""
    if type(model) is not LLM or model.config.pos_emb not in _POS_EMBS:
        return False
    if type(model.norm_f) not in _NORMS:
        return False
    return all(type(b) is Block and type(b.attn) in _ATTENTION and type(b.ffn) in _FFN
               and type(b.attn_norm) in _NORMS and type(b.ffn_norm) in _NORMS
               for b in model.blocks)


def _weights_key(model: nn.Module) -> tuple | object:
    """What the prepared weights depend on: each parameter's identity, storage and version
    (an inference tensor has no version counter: a fresh key, never equal to another)."""
    params = list(model.parameters())
    if any(p.is_inference() for p in params):
        return object()
    return tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in params)


class _Rotary:
    """RoPE tables for every position of the window, for rows of `plain + dim` numbers whose
    first `plain` pass unchanged and whose last `dim` rotate. At one position
    x * cos + x[perm] * sin_signed equals apply_rope's rotate-half formula exactly
    (x1 cos - x2 sin, x2 cos + x1 sin: the same products and sums); a plain number meets
    cos 1 and sin 0, and x * 1 + x * 0 is x."""

    def __init__(self, positions: Positions, dim: int, plain: int, dtype: torch.dtype):
        cos, sin = positions.rope(dim)  # (block_size, dim/2)
        device = cos.device
        self.cos = torch.cat((cos, cos), dim=-1).to(dtype)  # (block_size, dim)
        self.sin = torch.cat((-sin, sin), dim=-1).to(dtype)
        half = dim // 2
        perm = torch.cat((torch.arange(half, dim), torch.arange(half))) + plain
        self.perm = torch.cat((torch.arange(plain), perm)).to(device)
        self.plain = plain
        self.ones = torch.ones(plain, dtype=dtype, device=device)
        self.zeros = torch.zeros(plain, dtype=dtype, device=device)

    def at(self, position: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The rotation at one position, for (..., plain + dim) rows (built once per step)."""
        cos, sin, perm = self.cos[position], self.sin[position], self.perm
        if self.plain:
            cos, sin = torch.cat((self.ones, cos)), torch.cat((self.zeros, sin))
        return lambda x: x * cos + x.index_select(-1, perm) * sin


class FastDecoder:
    """Prefill, then `step(token)` -> next logits, for a model with `supports(model)`.

    The cache holds room for `total_tokens` (prompt + tokens to generate, at most
    block_size); `step` may be called while `length < block_size`. The step works on
    (B, C) rows: one position per sequence. Each layer's weights, norms and head counts
    are looked up once, here, into a `_Layer`; a step only runs arithmetic.

    A decoder can be kept for many prompts (a chat's turns, an evaluation's requests):
    each `prefill` starts a new cache and reuses the weight copies while the model's
    parameters are the same tensors with the same version counters (an optimizer step,
    `load_state_dict` or `.to()` makes it prepare them again). Writes through `.data`
    bypass version counters: make a new decoder after those."""

    def __init__(self, model: LLM, total_tokens: int):
        self.model = model
        self.config = model.config
        self.block_size = model.config.block_size
        self.total_tokens = min(total_tokens, self.block_size)
        self.cache: KVCache | None = None
        self._room = 0  # tokens every layer's buffers hold
        self._prepare()

    def _prepare(self) -> None:
        """The weights in the step's layout, the layers and the rotation tables."""
        model = self.model
        self._weights = _weights_key(model)
        # the position tables of the reference path, for every position at once
        self.positions = Positions(0, self.block_size, model.wte.weight.device,
                                   model.config.rope_theta)
        self._rotary: dict[tuple[int, int], _Rotary] = {}
        self.owned = owns_copies(model)
        wt = transposed_weights(model, copy=self.owned, head=False)
        self._layers = [_Layer(self, block, wt) for block in model.blocks]
        self._final_norm = _norm_fn(model.norm_f)
        self._head_t: torch.Tensor | None = None  # `_full_head`, made on first use
        self._screen: ScreenedArgmax | None | object = _UNBUILT
        self._sampler: ScreenedSampler | None = None

    @property
    def length(self) -> int:
        return self.cache.length if self.cache is not None else 0

    def prefill(self, idx: torch.Tensor, total_tokens: int | None = None) -> torch.Tensor:
        """(B, T) prompt -> (B, V) logits of its last position (the model's own forward),
        in a new cache with room for `total_tokens` (default: the constructor's)."""
        if total_tokens is not None:
            self.total_tokens = min(total_tokens, self.block_size)
        if _weights_key(self.model) != self._weights:  # the model changed since: again
            self._prepare()
        self.cache = None  # the previous prompt's cache goes before the new one is made
        self.cache = KVCache(len(self.model.blocks), capacity=self.block_size,
                             reserve=self.total_tokens)
        out = self.model(idx, kv_cache=self.cache, last_logits_only=True)
        self._bind()
        return out.logits[:, -1]

    def rotary(self, dim: int, plain: int = 0) -> _Rotary:
        key = (plain, dim)
        if key not in self._rotary:
            self._rotary[key] = _Rotary(self.positions, dim, plain, self.model.wte.weight.dtype)
        return self._rotary[key]

    def _bind(self) -> None:
        """Point the layers at the cache buffers (after they are allocated or grown)."""
        for layer, layer_cache in zip(self._layers, self.cache.layers, strict=True):
            layer.bind(layer_cache)
        self._room = min(layer_cache.allocated for layer_cache in self.cache.layers)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """(B,) token ids -> (B, V) logits of the next position."""
        return head_logits(self._final_rows(token), self._full_head(),
                           self.config.logit_softcap)

    def _full_head(self) -> torch.Tensor:
        """The head's (C, V) weights for the whole vocabulary's logits, in the step's layout
        (made on the first step that needs them)."""
        if self._head_t is None:
            self._head_t = transposed(self.model.lm_head.weight, self.owned)
        return self._head_t

    def _head_screen(self) -> ScreenedArgmax | None:
        """The int8 screen of the head, built on first use (None where there is none)."""
        if self._screen is _UNBUILT:
            self._screen = (ScreenedArgmax.build(self.model.lm_head.weight, self._full_head,
                                                 self.config.logit_softcap)
                            if self.owned else None)
            self._sampler = (ScreenedSampler(self._screen)
                             if self._screen is not None else None)
        return self._screen

    def greedy_step(self, token: torch.Tensor, vocab_limit: int | None = None) -> torch.Tensor:
        """(B,) token ids -> (B,) argmax of the next position's logits (ids below
        `vocab_limit`): `step(token)`'s argmax, from the int8 screen of the head where
        there is one (`greedy_head.ScreenedArgmax`)."""
        rows = self._final_rows(token)
        screen = self._head_screen()
        if screen is not None:
            return screen(rows, vocab_limit)
        return full_argmax(rows, self._full_head(), self.config.logit_softcap, vocab_limit)

    def sampled_step(self, token: torch.Tensor, temperature: float, top_k: int | None = None,
                     top_p: float | None = None, vocab_limit: int | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) token ids -> (B,) next tokens drawn from `step(token)`'s distribution
        (`sampling.sample_next`, ids below `vocab_limit`), without top-p through the screen
        of the head (`sampled_head.ScreenedSampler`): top-k the full head's tokens for the
        same random numbers, untruncated at one row by rejection (exact in distribution,
        other random numbers)."""
        rows = self._final_rows(token)
        # the screen is built only where a draw could use it (its build costs a few steps)
        head_shape = tuple(self.model.lm_head.weight.shape)
        screenable = (temperature > 0 and not truncates_top_p(top_p)
                      and ScreenedSampler.applies(head_shape, rows.shape[0], top_k, vocab_limit))
        if screenable and self._head_screen() is not None:
            chosen = self._sampler(rows, temperature, top_k, vocab_limit, generator)
            if chosen is not None:
                return chosen
        logits = head_logits(rows, self._full_head(), self.config.logit_softcap)
        return sample_next(mask_padding(logits, vocab_limit), temperature, top_k, top_p,
                           generator)

    def _final_rows(self, token: torch.Tensor) -> torch.Tensor:
        """(B,) token ids -> (B, C) rows of the final norm, the head's input."""
        model, cfg = self.model, self.config
        at = self.cache.length
        if at >= self.block_size:
            raise ValueError("the cache is full (block_size tokens); crop and prefill again")
        if at + 1 > self._room:  # no room reserved: grow as the model would
            for layer_cache in self.cache.layers:
                if at + 1 > layer_cache.allocated:
                    layer_cache._grow(tuple(layer_cache.buffers), at + 1)
            self._bind()
        x = F.embedding(token, model.wte.weight)  # (B, C)
        if model.wpe is not None:
            x = x + model.wpe.weight[at]
        elif cfg.pos_emb == "sin":
            x = x + sinusoidal(torch.tensor([at], device=x.device), cfg.n_embd).to(x.dtype)
        # the rotations of this position, per table (shared by the layers)
        rotations = {key: rotary.at(at) for key, rotary in self._rotary.items()}
        for layer, layer_cache in zip(self._layers, self.cache.layers, strict=True):
            x = layer.attend(layer.attn_norm(x), x, layer_cache, at, rotations)
            x = layer.feed_forward(layer.ffn_norm(x), x)
        return self._final_norm(x)


def _norm_fn(module: nn.Module, gain: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """The norm as a function of the rows, with its arguments looked up once (`gain`
    multiplies its weight: a scale folded in)."""
    shape, weight, eps = module.normalized_shape, module.weight, module.eps
    if gain != 1.0:
        weight = weight.detach() * gain
    if type(module) is nn.LayerNorm:
        bias = module.bias
        return lambda x: torch.layer_norm(x, shape, weight, bias, eps)
    return lambda x: F.rms_norm(x, shape, weight, eps)


def _add_product(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x + a @ w, into x where all three share a dtype (not copying x first); under autocast,
    whose products return another dtype, a new tensor as the reference path makes."""
    if x.dtype == a.dtype == w.dtype:
        return x.addmm_(a, w)
    return torch.addmm(x, a, w)


def _attend(q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor,
            scale: float | None) -> torch.Tensor:
    """(Bk, G, d) queries of the newest position (the G query heads that share each of the
    Bk = B * Hkv KV heads) over (Bk, d, L) transposed keys and (Bk, L, dv) values ->
    (Bk, G, dv). `scale`: the softmax scale, None where the queries carry it already."""
    if q.dtype not in (torch.float32, torch.float64):  # SDPA's kernel accumulates in fp32
        y = F.scaled_dot_product_attention(q[:, None], keys_t.transpose(1, 2)[:, None],
                                           values[:, None], scale=scale or 1.0)
        return y[:, 0]
    if scale is not None:  # on the queries: fewer numbers than the scores
        q = q * scale
    probs = torch.bmm(q, keys_t).softmax(dim=-1)  # (Bk, G, L)
    return torch.bmm(probs, values)


class _Layer:
    """One block's decoding step: `attend(h, x, ...)` and `feed_forward(h, x)` return x plus
    the sublayer's output for the normed rows h (x itself, added to in place, where they
    can: x is the step's own residual row)."""

    def __init__(self, decoder: FastDecoder, block: Block, wt: dict[int, torch.Tensor]):
        self.attn_norm, self.ffn_norm = _norm_fn(block.attn_norm), _norm_fn(block.ffn_norm)
        attn, ffn = block.attn, block.ffn
        self.attn, self.ffn = attn, ffn
        if type(attn) is CausalSelfAttention:
            self._init_attention(decoder, attn, wt)
        else:
            self._init_mla(decoder, attn, wt)
        if type(ffn) is MLP:  # the residual add rides on the down projection
            self.feed_forward = self._mlp
            self.w_up, self.w_down = wt[id(ffn.up.weight)], wt[id(ffn.down.weight)]
            self.non_linearity = ffn.non_linearity
        else:
            self.feed_forward = self._moe

    def _init_attention(self, decoder: FastDecoder, attn: CausalSelfAttention,
                        wt: dict[int, torch.Tensor]) -> None:
        self.attend, self.latent = self._attention, False
        H, kv, hd = attn.n_head, attn.n_kv_heads, attn.head_dim
        self.heads = (H, kv, hd)
        self.w_qkv, self.w_proj = wt[id(attn.qkv.weight)], wt[id(attn.proj.weight)]
        scale = 1.0 / math.sqrt(hd)
        # the softmax scale rides on the queries' weights where the step owns a copy of
        # them, or on the query norm's gains (QK-norm)
        folded = (decoder.owned and attn.q_head_norm is not None) or copied(
            attn.qkv.weight.shape, decoder.owned)
        self.scale = None if folded else scale
        if attn.q_head_norm is None:
            self.qk_norms = None
            if folded:  # this layer's own copy
                self.w_qkv[:, :H * hd] *= scale
        else:
            self.qk_norms = (_norm_fn(attn.q_head_norm, scale if folded else 1.0),
                             _norm_fn(attn.k_head_norm))
        self.rope_dim = hd if attn.rope else 0
        if self.rope_dim:
            decoder.rotary(hd)  # its tables exist before the first step

    def _init_mla(self, decoder: FastDecoder, attn: MultiHeadLatentAttention,
                  wt: dict[int, torch.Tensor]) -> None:
        self.attend, self.latent = self._mla, True
        H, hd, r, lat = attn.n_head, attn.head_dim, attn.rope_dim, attn.kv_latent_dim
        ql = attn.q_down.weight.shape[0]  # the query latent's width
        # one product for [query latent | c | k_rope], in the layout that streams faster
        # (the join is a copy either way: an (in, out) one where a copy pays)
        down = (attn.q_down.weight.detach(), attn.kv_down.weight.detach())
        joined = (sum(w.shape[0] for w in down), down[0].shape[1])  # (ql + lat + r, C)
        self.w_in = (torch.cat([w.t() for w in down], dim=1) if copied(joined, decoder.owned)
                     else torch.cat(down).t())
        self.w_proj = wt[id(attn.proj.weight)]
        self.q_norm, self.kv_norm = _norm_fn(attn.q_norm), _norm_fn(attn.kv_norm)
        w_uk, w_uv = attn.kv_up.weight.detach().view(2, H, hd, lat)  # (H, hd, lat) each
        self.w_uv_t = w_uv.transpose(1, 2).contiguous()  # W_uv^T as (H, lat, hd)
        self.absorbed = decoder.owned and (
            ql * H * (lat + r) <= ql * H * (hd + r) + H * hd * lat + _ABSORB_SLACK)
        w_q = wt[id(attn.q_up.weight)]  # (ql, H * (hd + r))
        if self.absorbed:  # per head [q_latent W_uq,h W_uk,h | q_latent W_qr,h], scaled
            w = w_q.double().reshape(ql, H, hd + r)
            with torch.autocast(w.device.type, enabled=False):  # in fp64 under any autocast
                nope = torch.einsum("qhd,hdc->qhc", w[..., :hd], w_uk.double())  # (ql, H, lat)
            merged = torch.cat((nope, w[..., hd:]), dim=-1) * attn.scale
            self.w_q = merged.reshape(ql, H * (lat + r)).to(w_q.dtype)
        # the softmax scale rides on the queries' weights where the step owns them
        folded = self.absorbed or copied(attn.q_up.weight.shape, decoder.owned)
        if not self.absorbed:
            self.w_q, self.w_uk = w_q, w_uk.contiguous()
            if folded:  # this layer's own copy
                self.w_q *= attn.scale
        self.scale = None if folded else attn.scale
        self.dims = (H, hd, r, lat, ql)
        self.positions_theta = decoder.config.rope_theta
        if r:  # the tables exist before the first step
            decoder.rotary(r, plain=lat)  # key rows [c | k_rope] and absorbed queries
            if not self.absorbed:
                decoder.rotary(r, plain=hd)  # queries [q_nope | q_rope]

    def bind(self, layer_cache: LayerCache) -> None:
        """Views of this layer's cache buffers, for writing rows and reading keys / values
        (made again whenever the buffers are reallocated)."""
        if not self.latent:
            keys, values = layer_cache.buffers  # (B, Hkv, A, hd) each, contiguous
            B, kv, A, hd = keys.shape
            self.key_rows, self.value_rows = keys, values
            self.keys_t = keys.view(B * kv, A, hd).transpose(1, 2)  # (B * Hkv, hd, A)
            self.values = values.view(B * kv, A, hd)
        elif self.attn.q_head_norm is None:  # MLA: one buffer of [c | k_rope] rows
            (latents,) = layer_cache.buffers  # (B, A, lat + r)
            self.rows = latents
            self.keys_t = latents.transpose(1, 2)  # (B, lat + r, A)
            self.values = latents[..., :self.dims[3]]  # (B, A, lat)

    def _mlp(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        up = torch.mm(h, self.w_up)
        return _add_product(x, activate(up, self.non_linearity), self.w_down)

    def _moe(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(h[:, None])[0][:, 0]

    def _attention(self, h: torch.Tensor, x: torch.Tensor, layer_cache: LayerCache, at: int,
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
            qk = rotations[(0, hd)](qk)
        self.key_rows.select(-2, at).copy_(qk[:, H:])
        self.value_rows.select(-2, at).copy_(qkv[:, H + kv:])
        layer_cache.length = L = at + 1
        y = _attend(qk[:, :H].reshape(B * kv, H // kv, hd), self.keys_t[..., :L],
                    self.values[:, :L], self.scale)  # (B * kv, H / kv, hd)
        return _add_product(x, y.view(B, H * hd), self.w_proj)

    def _mla(self, h: torch.Tensor, x: torch.Tensor, layer_cache: LayerCache, at: int,
             rotations: dict) -> torch.Tensor:
        """x + MLA of the (B, C) rows h, attending to the cached latents (absorbed)."""
        attn = self.attn
        B = h.shape[0]
        if attn.q_head_norm is not None:  # QK-norm's absorbed form: the module's own path
            pos = Positions(at, 1, h.device, self.positions_theta)
            return x + attn(h[:, None], pos, layer_cache)[:, 0]
        H, hd, r, lat, ql = self.dims
        latents = torch.mm(h, self.w_in)  # (B, ql + lat + r): [query latent | c | k_rope]
        key_row = latents[:, ql:]  # (B, lat + r)
        if self.absorbed:  # (B, H, lat + r): [q W_uk | q_rope] per head
            q = torch.mm(self.q_norm(latents[:, :ql]), self.w_q).view(B, H, lat + r)
            if r:  # the queries' and the key's rotary parts turn by the same angles
                rotate = rotations[(lat, r)]
                q, key_row = rotate(q), rotate(key_row)
        else:
            q = torch.mm(self.q_norm(latents[:, :ql]), self.w_q).view(B, H, hd + r)
            if r:
                q, key_row = rotations[(hd, r)](q), rotations[(lat, r)](key_row)
            q_c = torch.bmm(q[..., :hd].transpose(0, 1), self.w_uk).transpose(0, 1)
            q = torch.cat((q_c, q[..., hd:]), dim=-1) if r else q_c  # (B, H, lat + r)
        row = self.rows.select(-2, at)  # (B, lat + r): [c | k_rope], written in place
        if r:
            torch.cat((self.kv_norm(key_row[:, :lat]), key_row[:, lat:]), dim=-1, out=row)
        else:
            row.copy_(self.kv_norm(key_row))
        layer_cache.length = L = at + 1
        # one KV head shared by all: keys are the rows [c, k_rope], values their c part
        o = _attend(q, self.keys_t[..., :L], self.values[:, :L], self.scale)  # (B, H, lat)
        y = torch.bmm(o.transpose(0, 1), self.w_uv_t).transpose(0, 1)  # (B, H, hd)
        return _add_product(x, y.reshape(B, H * hd), self.w_proj)
