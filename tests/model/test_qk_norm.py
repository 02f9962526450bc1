"""QK-norm for every attention kind: the KV cache equals the full forward, queries are
scale-free, the gains are learned."""

from __future__ import annotations

import pytest
import torch

from llmctl.model import LLM

from .test_cache import _full_vs_cached


@pytest.mark.parametrize("pos_emb", ["learn", "rope"])
@pytest.mark.parametrize("attn", ["mha", "mqa", "gqa", "mla"])
def test_cached_decoding_equals_full_forward(make_config, attn: str, pos_emb: str) -> None:
    torch.manual_seed(0)
    model = LLM(make_config(attn=attn, pos_emb=pos_emb, qk_norm=True, norm="rms"))
    with torch.no_grad():  # non-trivial gains, so that moving them into the query is tested
        for name, param in model.named_parameters():
            if "head_norm" in name:
                param.uniform_(0.5, 2.0)
    idx = torch.randint(0, 61, (2, 20))
    assert _full_vs_cached(model, idx, prefill=7) <= 1e-4
    assert _full_vs_cached(model, idx, prefill=6, chunk=5) <= 1e-4  # (T, L) mask path


@pytest.mark.parametrize("attn", ["mha", "gqa", "mla"])
def test_logits_do_not_depend_on_the_query_scale(make_config, attn: str) -> None:
    torch.manual_seed(0)
    idx = torch.randint(0, 61, (2, 12))
    for qk_norm, same in ((True, True), (False, False)):
        model = LLM(make_config(attn=attn, pos_emb="rope", qk_norm=qk_norm)).eval()
        with torch.no_grad():
            before = model(idx, use_cache=False).logits
            for block in model.blocks:  # scale the query projection only
                if attn == "mla":
                    block.attn.q_up.weight.mul_(10)
                else:
                    block.attn.qkv.weight[:32].mul_(10)
            after = model(idx, use_cache=False).logits
        assert torch.allclose(before, after, atol=1e-4) is same


def test_gains_are_parameters_and_off_by_default(make_config) -> None:
    names = [n for n, _ in LLM(make_config(attn="mla", qk_norm=True)).named_parameters()]
    assert "blocks.0.attn.q_head_norm.weight" in names
    assert "blocks.0.attn.k_head_norm.weight" in names
    assert not any("head_norm" in n for n, _ in LLM(make_config()).named_parameters())
