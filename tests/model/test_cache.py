"""Prefill + cached decoding equals one full forward, for every attention / position / norm."""

from __future__ import annotations

import pytest
import torch

from llmctl.model import LLM


def _full_vs_cached(model: LLM, idx: torch.Tensor, prefill: int, chunk: int = 1) -> float:
    model.eval()
    with torch.no_grad():
        full = model(idx, use_cache=False).logits  # (B, T, V)
        out = model(idx[:, :prefill])
        pieces = [out.logits]
        for t in range(prefill, idx.size(1), chunk):
            out = model(idx[:, t:t + chunk], kv_cache=out.kv_cache)
            pieces.append(out.logits)
    assert out.kv_cache.length == idx.size(1)
    return (torch.cat(pieces, dim=1) - full).abs().max().item()


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("pos_emb", ["learn", "sin", "rope", "alibi"])
@pytest.mark.parametrize("attn", ["mha", "mqa", "gqa", "mla"])
def test_prefill_then_decode_equals_full_forward(make_config, attn: str, pos_emb: str,
                                                norm: str) -> None:
    model = LLM(make_config(attn=attn, pos_emb=pos_emb, norm=norm))
    idx = torch.randint(0, 61, (2, 20))
    assert _full_vs_cached(model, idx, prefill=7) <= 1e-4


@pytest.mark.parametrize("pos_emb", ["learn", "sin", "rope", "alibi"])
def test_heterogeneous_stack_with_moe(make_config, mixed_layers, pos_emb: str) -> None:
    model = LLM(make_config(pos_emb=pos_emb, layer_configs=mixed_layers, n_layer=None))
    idx = torch.randint(0, 61, (3, 22))
    assert _full_vs_cached(model, idx, prefill=5) <= 1e-4


@pytest.mark.parametrize("attn", ["mha", "gqa", "mla"])
def test_chunked_prefill_after_a_cached_prefix(make_config, moe_flags, attn: str) -> None:
    # Several new tokens on top of a cache take the explicit (T, L) mask path.
    model = LLM(make_config(attn=attn, pos_emb="rope", **moe_flags))
    idx = torch.randint(0, 61, (2, 21))
    assert _full_vs_cached(model, idx, prefill=6, chunk=5) <= 1e-4


def test_cache_is_updated_in_place_and_bounded_by_block_size(make_config) -> None:
    model = LLM(make_config()).eval()
    with torch.no_grad():
        cache = model(torch.zeros(1, 20, dtype=torch.long)).kv_cache
        out = model(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)
        assert out.kv_cache is cache and cache.length == 24
        with pytest.raises(ValueError, match="block_size"):
            model(torch.zeros(1, 1, dtype=torch.long), kv_cache=out.kv_cache)
        with pytest.raises(ValueError, match="block_size"):
            model(torch.zeros(1, 25, dtype=torch.long))


def test_training_call_builds_no_cache_and_prefill_does(make_config) -> None:
    model = LLM(make_config())
    idx = torch.randint(0, 61, (2, 10))
    assert model(idx, targets=idx).kv_cache is None
    with torch.no_grad():
        out = model(idx)
    assert out.kv_cache is not None and out.kv_cache.length == 10
    assert out.loss is None and out.logits.shape == (2, 10, 61)
    with torch.no_grad():  # an explicit cache is used even with targets
        scored = model(idx[:, :3], targets=idx[:, :3], kv_cache=out.kv_cache)
    assert scored.kv_cache is out.kv_cache and out.kv_cache.length == 13
    with pytest.raises(ValueError, match="use_cache=False"):
        model(idx, kv_cache=out.kv_cache, use_cache=False)


def test_layer_cache_grows_by_doubling_and_keeps_its_history() -> None:
    from llmctl.model.cache import LayerCache

    cache = LayerCache(capacity=300)
    torch.manual_seed(0)
    k_all, v_all = torch.randn(2, 4, 300, 8), torch.randn(2, 4, 300, 5)
    sizes = []
    for start, end in [(0, 3), *((t, t + 1) for t in range(3, 200)), (200, 300)]:
        k, v = cache.append(k_all[..., start:end, :], v_all[..., start:end, :])
        assert torch.equal(k, k_all[..., :end, :]) and torch.equal(v, v_all[..., :end, :])
        sizes.append(cache.allocated)
    assert sorted(set(sizes)) == [64, 128, 256, 300]  # a short prompt allocates 64 rows
    assert cache.numbers_per_token == 4 * (8 + 5)  # per token of one sequence, all heads
    assert cache.capacity_nbytes == cache.nbytes == 2 * 4 * 300 * 13 * 4
    with pytest.raises(ValueError, match="overflow"):
        cache.append(k_all[..., :1, :], v_all[..., :1, :])


def test_long_model_prefill_allocates_only_what_it_needs(make_config) -> None:
    model = LLM(make_config(block_size=512)).eval()
    with torch.no_grad():
        cache = model(torch.zeros(1, 5, dtype=torch.long)).kv_cache
    assert all(layer.allocated == 64 for layer in cache.layers)
    assert cache.nbytes * 8 == cache.capacity_nbytes
