"""ALiBi: the paper's slopes, the bias table, and attention with it against a naive reference."""

from __future__ import annotations

import math

import pytest
import torch

from llmctl.model import LLM
from llmctl.model.positional import Positions, alibi_bias, alibi_slopes


def test_slopes_are_the_papers() -> None:
    # 8 heads: 1/2, 1/4, ..., 1/256 (the paper's example).
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 4 heads: start 2^(-8/4) = 1/4, then its powers.
    assert torch.allclose(alibi_slopes(4), torch.tensor([0.25, 0.0625, 0.015625, 0.00390625]))
    # 6 heads (not a power of two): the 4-head slopes, then slopes 0 and 2 of the 8-head set.
    expected = [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
    assert torch.allclose(alibi_slopes(6), torch.tensor(expected))


def test_bias_equals_a_hand_computation() -> None:
    slopes = torch.tensor([0.5, 0.25])
    bias = alibi_bias(slopes, T=2, L=4)  # queries at positions 2 and 3 of keys 0..3
    inf = float("-inf")
    expected = torch.tensor([
        [[-1.0, -0.5, 0.0, inf], [-1.5, -1.0, -0.5, 0.0]],
        [[-0.5, -0.25, 0.0, inf], [-0.75, -0.5, -0.25, 0.0]],
    ])
    assert torch.equal(bias, expected)
    pos = Positions(2, 2, torch.device("cpu"), 10000.0)
    assert torch.equal(pos.alibi(4, 4)[:2], alibi_bias(alibi_slopes(4)[:2], 2, 4))


def _naive_alibi_attention(model: LLM, x: torch.Tensor) -> torch.Tensor:
    """Block 0's mha attention written out: softmax(q k^T / sqrt(d) - m_h (i - j)) v."""
    attn = model.blocks[0].attn
    B, T, C = x.shape
    H, hd = attn.n_head, attn.head_dim
    q, k, v = attn.qkv(x).split(C, dim=-1)
    q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, H, T, T)
    slopes = alibi_slopes(H)
    for h in range(H):
        for i in range(T):
            for j in range(T):
                scores[:, h, i, j] = (scores[:, h, i, j] - slopes[h] * (i - j) if j <= i
                                      else float("-inf"))
    y = scores.softmax(-1) @ v  # (B, H, T, hd)
    return attn.proj(y.transpose(1, 2).reshape(B, T, C))


def test_attention_with_alibi_equals_a_naive_reference(make_config) -> None:
    model = LLM(make_config(attn="mha", pos_emb="alibi", init_std=0.2)).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        got = model.blocks[0].attn(x, Positions(0, 7, x.device, 10000.0))
        want = _naive_alibi_attention(model, x)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("attn", ["mha", "gqa", "mla"])
def test_alibi_shifts_nothing_but_distances(make_config, attn: str) -> None:
    # Only distances matter: a sequence's logits do not depend on where the cache window
    # started, so dropping the oldest cached tokens keeps the later ones' attention exact.
    # With one layer the cached keys depend on their own token only, so a slid cache must
    # equal a fresh run on the kept tokens exactly.
    idx = torch.randint(0, 61, (1, 12))
    one = LLM(make_config(attn=attn, pos_emb="alibi", init_std=0.2, n_layer=1)).eval()
    with torch.no_grad():
        out = one(idx[:, :8])
        out.kv_cache.drop_oldest(3)
        slid = one(idx[:, 8:], kv_cache=out.kv_cache).logits
        fresh = one(idx[:, 3:], use_cache=False).logits[:, 5:]
    assert torch.allclose(slid, fresh, atol=1e-5)
