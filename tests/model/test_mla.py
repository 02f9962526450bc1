"""Multi-head latent attention: cache size, training path == generation path, and a naive
reference of the DeepSeek-V2 formulas."""

from __future__ import annotations

import math

import pytest
import torch

from llmctl.config import BlockConfig
from llmctl.model import LLM
from llmctl.model.cache import LayerCache
from llmctl.model.mla import MultiHeadLatentAttention
from llmctl.model.positional import Positions, apply_rope


def _mla(rope: bool, norm: str = "rms") -> MultiHeadLatentAttention:
    block = BlockConfig(attn="mla", n_head=4, q_latent_dim=12, kv_latent_dim=10,
                        rope_head_dim=6 if rope else None)
    module = MultiHeadLatentAttention(block, n_embd=32, dropout=0.0,
                                      pos_emb="rope" if rope else "learn", norm=norm)
    for p in module.parameters():  # random norm weights too, so nothing cancels by accident
        torch.nn.init.normal_(p, 0.0, 0.3)
    return module


@pytest.mark.parametrize("pos_emb,expected", [("rope", 12 + 4), ("learn", 12), ("sin", 12)])
def test_cache_holds_only_the_latent_and_rope_key(make_config, pos_emb: str,
                                                  expected: int) -> None:
    model = LLM(make_config(attn="mla", pos_emb=pos_emb, n_layer=3)).eval()
    B, T = 3, 9
    with torch.no_grad():
        cache = model(torch.randint(0, 61, (B, T))).kv_cache
    block_size = model.config.block_size
    for layer in cache.layers:
        assert layer.numbers_per_token == expected  # kv_latent_dim (+ rope_head_dim)
        assert [(b.shape[0], b.shape[-1]) for b in layer.buffers] == [(B, expected)]
        assert T <= layer.allocated <= block_size
    assert cache.capacity_nbytes == 3 * B * block_size * expected * 4


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("rope", [True, False])
def test_training_path_equals_generation_path(rope: bool, norm: str) -> None:
    torch.manual_seed(2)
    mla = _mla(rope, norm)
    x = torch.randn(2, 11, 32)
    train_out = mla(x, Positions(0, 11, x.device, 10000.0))  # decompressed K/V, SDPA
    cache = LayerCache(capacity=16)
    prefill = mla(x[:, :4], Positions(0, 4, x.device, 10000.0), cache)  # absorbed, causal
    steps = [mla(x[:, t:t + 1], Positions(t, 1, x.device, 10000.0), cache)
             for t in range(4, 11)]
    gen_out = torch.cat([prefill, *steps], dim=1)
    assert (train_out - gen_out).abs().max() <= 1e-4


@pytest.mark.parametrize("rope", [True, False])
def test_matches_naive_latent_attention(rope: bool) -> None:
    torch.manual_seed(3)
    mla = _mla(rope)
    B, T, H, hd, r = 2, 7, 4, 8, (6 if rope else 0)
    x = torch.randn(B, T, 32)
    y = mla(x, Positions(0, T, x.device, 10000.0))

    q = mla.q_up(mla.q_norm(mla.q_down(x))).view(B, T, H, hd + r)
    down = mla.kv_down(x)
    c = mla.kv_norm(down[..., :10])  # (B, T, kv_latent)
    k_rope = down[..., 10:]  # (B, T, r), one rotary key for all heads
    k_nope = c @ mla.kv_up.weight[: H * hd].T  # (B, T, H * hd)
    v = c @ mla.kv_up.weight[H * hd:].T
    pos = Positions(0, T, x.device, 10000.0)
    outs = []
    for h in range(H):
        qn, qr = q[:, :, h, :hd], q[:, :, h, hd:]
        scores = qn @ k_nope[..., h * hd:(h + 1) * hd].transpose(1, 2)
        if rope:
            cos, sin = pos.rope(r)
            kr = apply_rope(k_rope, cos, sin)  # (B, T, r)
            scores = scores + apply_rope(qr, cos, sin) @ kr.transpose(1, 2)
        scores = scores / math.sqrt(hd + r)
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        outs.append(scores.softmax(-1) @ v[..., h * hd:(h + 1) * hd])
    expected = mla.proj(torch.cat(outs, dim=-1))
    assert (y - expected).abs().max() <= 1e-4
