"""inspect: counts equal the real model's, and the FLOPs / KV-cache / memory formulas."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from llmctl.config import load_config
from llmctl.model import LLM
from llmctl.model.costs import build_meta_model, inspect_model, training_flops_per_token

BASE = dict(n_layer=2, n_embd=64, n_head=4, n_kv_heads=2, vocab_size=100, block_size=64,
            up_dim=96, q_latent_dim=32, kv_latent_dim=16, rope_head_dim=8, batch_size=2,
            device="cpu")
FFNS = {
    "gelu": {},
    "swiglu": {"non_linearity": "swiglu"},
    "moe": {"moe": True, "n_exp": 8, "n_shared": 1, "n_act": 3, "coeff": 0.01},
    "moe-aux-free": {"moe": True, "n_exp": 6, "n_shared": 0, "n_act": 2, "aux_free": True,
                     "alpha": 0.01, "gamma": 0.01, "non_linearity": "swiglu"},
}


def _run(**flags):
    return load_config(overrides={**BASE, **flags}, check_batch_split=False)


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("pos_emb", ["learn", "rope"])
@pytest.mark.parametrize("ffn", list(FFNS))
@pytest.mark.parametrize("attn", ["mha", "mqa", "gqa", "mla"])
def test_counts_equal_the_real_model(attn: str, ffn: str, pos_emb: str) -> None:
    cfg = _run(attn=attn, pos_emb=pos_emb, **FFNS[ffn]).model
    report = inspect_model(cfg)
    model = LLM(cfg)
    p = report["params"]
    assert p["total"] == _numel(model)
    assert p["embedding"] == 100 * 64 + (64 * 64 if pos_emb == "learn" else 0)
    assert p["non_embedding"] == p["total"] - p["embedding"]
    for entry, block in zip(report["layers"], model.blocks, strict=True):
        assert entry["attention"] == _numel(block.attn)
        assert entry["ffn"] == _numel(block.ffn)
        assert entry["norms"] == _numel(block.attn_norm) + _numel(block.ffn_norm)
    if cfg.layers[0].moe:
        b = cfg.layers[0]
        routed = b.n_exp - b.n_shared
        per_expert = (3 if b.non_linearity == "swiglu" else 2) * 64 * 96
        inactive = (routed - (b.n_act - b.n_shared)) * per_expert
        assert report["layers"][0]["routed_experts"] == routed * per_expert
        assert p["active_per_token"] == p["total"] - 2 * inactive
    else:
        assert p["active_per_token"] == p["total"]


def test_dense_counts_and_flops_by_hand() -> None:
    cfg = _run(attn="mha", pos_emb="learn").model
    C, V, T, U, L = 64, 100, 64, 96, 2
    per_layer = 3 * C * C + C * C + 2 * C * U + 2 * 2 * C  # qkv, proj, mlp, 2 LayerNorms
    report = inspect_model(cfg)
    assert report["params"]["total"] == V * C + T * C + L * per_layer + 2 * C
    active_non_embedding = L * per_layer + 2 * C
    expected = 6 * (active_non_embedding + V * C) + L * 12 * C * T
    assert report["flops"]["training_per_token"] == expected
    assert training_flops_per_token(cfg) == expected


def test_mla_and_moe_flops_by_hand() -> None:
    cfg = _run(attn="mla", pos_emb="rope", **FFNS["moe"]).model
    report = inspect_model(cfg)
    H, hd, r, T = 4, 16, 8, 64
    attention = 2 * 6 * H * T * ((hd + r) + hd)
    expected = 6 * (report["params"]["active_non_embedding"] + 100 * 64) + attention
    assert report["flops"]["training_per_token"] == expected
    # MoE: only the active experts count
    assert report["params"]["active_non_embedding"] < report["params"]["non_embedding"]


@pytest.mark.parametrize("pos_emb", ["learn", "rope"])
@pytest.mark.parametrize("attn", ["mha", "mqa", "gqa", "mla"])
def test_kv_cache_report_matches_the_real_cache(attn: str, pos_emb: str) -> None:
    cfg = _run(attn=attn, pos_emb=pos_emb).model
    report = inspect_model(cfg, kv_bytes_per_number=4)
    model = LLM(cfg).eval()
    with torch.no_grad():
        cache = model(torch.zeros(1, 3, dtype=torch.long)).kv_cache
    for entry, layer in zip(report["layers"], cache.layers, strict=True):
        assert entry["kv_cache_numbers_per_token"] == layer.numbers_per_token
    expected = {"mha": 2 * 64, "mqa": 2 * 16, "gqa": 2 * 2 * 16,
                "mla": 16 + (8 if pos_emb == "rope" else 0)}[attn]
    assert report["layers"][0]["kv_cache_numbers_per_token"] == expected
    assert report["kv_cache"]["bytes_per_token"] == 2 * expected * 4
    assert report["kv_cache"]["bytes_full_context"] == cache.capacity_nbytes  # fp32


def _saved_activation_bytes(model: LLM, idx: torch.Tensor) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        model(idx, targets=idx)
    return sum(saved.values())


@pytest.mark.parametrize("ffn", list(FFNS))
@pytest.mark.parametrize("attn,pos_emb", [("mha", "learn"), ("gqa", "rope"), ("mla", "rope"),
                                          ("mla", "sin"), ("mqa", "sin")])
def test_activation_estimate_is_close_to_what_autograd_keeps(attn: str, pos_emb: str,
                                                             ffn: str) -> None:
    run = _run(attn=attn, pos_emb=pos_emb, **FFNS[ffn])
    memory = inspect_model(run.model, run.train)["memory"]
    torch.manual_seed(0)
    measured = _saved_activation_bytes(LLM(run.model), torch.randint(0, 100, (2, 64)))
    assert memory["activations"] == pytest.approx(measured, rel=0.2)


def test_memory_states_and_act_recomp() -> None:
    run = _run(attn="gqa", n_layer=4)
    report = inspect_model(run.model, run.train)
    mem, total = report["memory"], report["params"]["total"]
    assert (mem["weights"], mem["grads"], mem["adamw_states"]) == (4 * total, 4 * total,
                                                                   8 * total)
    assert mem["activations_act_recomp"] < mem["activations"]
    assert mem["total"] == 16 * total + mem["activations"]
    bigger = _run(attn="gqa", n_layer=4, batch_size=6)
    assert inspect_model(bigger.model, bigger.train)["memory"]["activations"] == \
        3 * mem["activations"]
    assert "memory" not in inspect_model(run.model)


def test_seven_billion_parameters_on_the_meta_device() -> None:
    flags = dict(n_layer=32, n_embd=4096, n_head=32, vocab_size=32000, block_size=4096,
                 up_dim=11008, non_linearity="swiglu", norm="rms", pos_emb="rope", attn="mha")
    cfg = load_config(overrides=flags, check_batch_split=False).model
    model = build_meta_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    report = inspect_model(cfg)
    C, U = 4096, 11008
    expected = 32000 * C + 32 * (4 * C * C + 3 * C * U + 2 * C) + C
    assert report["params"]["total"] == expected  # 6.6B with the tied head
    assert report["kv_cache"]["bytes_full_context"] == 32 * 2 * C * 2 * 4096  # 2 GiB in bf16


def test_counts_build_the_meta_model_once_per_config(monkeypatch) -> None:
    from llmctl.model import costs

    built = []
    real = costs.build_meta_model
    monkeypatch.setattr(costs, "build_meta_model", lambda cfg: built.append(1) or real(cfg))
    cfg = _run(attn="gqa", n_layer=5, up_dim=72).model  # a config no other test counts
    first = training_flops_per_token(cfg)
    assert training_flops_per_token(cfg) == first and inspect_model(cfg)["flops"][
        "training_per_token"] == first
    assert len(built) == 1
    training_flops_per_token(_run(attn="gqa", n_layer=7, up_dim=72).model)
    assert len(built) == 2
