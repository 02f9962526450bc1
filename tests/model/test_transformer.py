"""The LLM: per-layer construction, act_recomp, init, tied weights, loss and outputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmctl.model import LLM
from llmctl.model.attention import CausalSelfAttention
from llmctl.model.mla import MultiHeadLatentAttention
from llmctl.model.mlp import MLP
from llmctl.model.moe import MoE


def test_each_layer_is_built_from_its_own_config(make_config, mixed_layers) -> None:
    cfg = make_config(layer_configs=mixed_layers, n_layer=None, norm="rms")
    model = LLM(cfg)
    kinds = [(type(b.attn), type(b.ffn)) for b in model.blocks]
    assert kinds == [(CausalSelfAttention, MLP), (CausalSelfAttention, MoE),
                     (MultiHeadLatentAttention, MoE), (CausalSelfAttention, MLP)]
    assert [b.attn.n_kv_heads for b in model.blocks if hasattr(b.attn, "n_kv_heads")] == [4, 2, 1]
    assert model.blocks[1].ffn.n_routed == 4 and model.blocks[1].ffn.top_k == 2
    assert model.blocks[2].ffn.aux_free and not model.blocks[1].ffn.aux_free
    assert isinstance(model.norm_f, torch.nn.RMSNorm)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("variant", ["dense", "mla-rope", "mixed"])
def test_act_recomp_gives_same_loss_and_gradients(make_config, mixed_layers, variant: str,
                                                  dropout: float) -> None:
    flags = {"dense": {}, "mla-rope": {"attn": "mla", "pos_emb": "rope"},
             "mixed": {"layer_configs": mixed_layers, "n_layer": None}}[variant]
    cfg = make_config(dropout=dropout, **flags)
    idx = torch.randint(0, 61, (2, 16))
    targets = idx.roll(-1, dims=1)
    results = []
    for recomp in (False, True):
        torch.manual_seed(0)
        model = LLM(cfg, act_recomp=recomp)
        torch.manual_seed(1)  # same dropout masks
        loss = model(idx, targets=targets).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name


def test_act_recomp_really_recomputes(make_config) -> None:
    model = LLM(make_config(), act_recomp=True)
    calls = []
    model.blocks[0].attn.register_forward_hook(lambda *a: calls.append(1))
    idx = torch.randint(0, 61, (1, 8))
    model(idx, targets=idx).loss.backward()
    assert len(calls) == 2  # forward, then again during backward


def test_gpt2_init(make_config) -> None:
    cfg = make_config(n_embd=64, n_head=4, up_dim=256, n_layer=4, vocab_size=512,
                      block_size=64, init_std=0.02, moe=True, n_exp=4, n_shared=1, n_act=2,
                      coeff=0.01)
    model = LLM(cfg)
    residual_std = 0.02 / math.sqrt(2 * 4)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(residual_std, rel=0.1)
    assert model.blocks[0].ffn.experts.w_down.std().item() == pytest.approx(residual_std,
                                                                            rel=0.1)
    assert model.blocks[0].ffn.shared.down.weight.std().item() == pytest.approx(residual_std,
                                                                                rel=0.1)
    assert torch.equal(model.blocks[0].attn_norm.weight, torch.ones(64))


def test_lm_head_is_tied_to_the_token_embedding(make_config) -> None:
    model = LLM(make_config())
    assert model.lm_head.weight is model.wte.weight
    n_unique = sum(p.numel() for p in model.parameters())
    n_listed = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert n_listed - n_unique == 61 * 32


def test_loss_ignores_minus_one_targets(make_config) -> None:
    model = LLM(make_config())
    idx = torch.randint(0, 61, (2, 10))
    targets = idx.clone()
    targets[:, :4] = -1
    out = model(idx, targets=targets)
    kept = out.logits[:, 4:].reshape(-1, 61)
    assert torch.allclose(out.loss, F.cross_entropy(kept, idx[:, 4:].reshape(-1)))


def test_last_logits_only_matches_the_full_last_row(make_config) -> None:
    model = LLM(make_config(pos_emb="rope")).eval()
    idx = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        full = model(idx).logits
        last = model(idx, last_logits_only=True).logits
    assert last.shape == (2, 1, 61)
    assert torch.allclose(full[:, -1:], last, atol=1e-6)


@pytest.mark.parametrize("pos_emb", ["learn", "sin", "rope", "alibi"])
def test_positions_reach_the_model(make_config, pos_emb: str) -> None:
    # Without position information, attention is blind to the order of earlier tokens.
    model = LLM(make_config(pos_emb=pos_emb, init_std=0.2)).eval()
    with torch.no_grad():
        a = model(torch.tensor([[3, 7, 11, 5]])).logits[0, -1]
        b = model(torch.tensor([[11, 3, 7, 5]])).logits[0, -1]
    assert (a - b).abs().max() > 1e-4
