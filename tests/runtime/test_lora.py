"""LoRA through real peft on tiny llmctl models: targets per attention kind, merge exactness."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from llmctl.config import load_config
from llmctl.core.errors import LlmctlError
from llmctl.model import LLM

pytest.importorskip("peft")

from llmctl.runtime import lora  # noqa: E402

BASE = {"n_layer": 2, "n_embd": 32, "n_head": 4, "block_size": 16, "vocab_size": 50,
        "up_dim": 48, "batch_size": 1, "total_batch_size": 16}
MLA = {"attn": "mla", "q_latent_dim": 16, "kv_latent_dim": 16, "rope_head_dim": 4,
       "pos_emb": "rope"}
MOE_LAYER = {"attn": "gqa", "n_head": 4, "n_kv_heads": 2, "moe": True, "up_dim": 24,
             "non_linearity": "swiglu", "n_exp": 4, "n_shared": 1, "n_act": 2, "coeff": 0.01}
KINDS = {
    "mha": ({"attn": "mha"}, "attention,mlp,lm_head"),
    "gqa": ({"attn": "gqa", "n_kv_heads": 2}, "attention,mlp"),
    "mla": (MLA, "attention,mlp,lm_head"),
    "moe": ({"layer_configs": json.dumps([MOE_LAYER, {**MOE_LAYER, "attn": "mha"}]),
             "n_layer": None}, "attention,mlp,experts,router"),
}


def _model(extra: dict) -> LLM:
    flags = {k: v for k, v in {**BASE, **extra}.items() if v is not None}
    torch.manual_seed(0)
    return LLM(load_config(overrides=flags).model).eval()


def _randomize_adapters(model: LLM) -> None:
    """lora_B starts at zero (a no-op adapter); give every adapter a real update."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.mark.parametrize("kind", list(KINDS))
def test_merged_logits_equal_base_plus_adapter(kind):
    extra, groups = KINDS[kind]
    model = _model(extra)
    x = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base_logits = model(x, use_cache=False).logits
    tuner = lora.attach(model, rank=4, alpha=8, dropout=0.0, groups=groups.split(","))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    _randomize_adapters(model)
    model.eval()
    with torch.no_grad():
        adapted = model(x, use_cache=False).logits
    assert (adapted - base_logits).abs().max() > 1e-2  # the adapters do something
    merged = lora.merge(tuner, model).eval()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        out = merged(x, use_cache=False).logits
        torch.testing.assert_close(out, adapted, atol=1e-5, rtol=0)
        # the merged model decodes with its KV cache (MLA: weight absorption) like a forward
        prefill = merged(x[:, :8]).kv_cache
        step = merged(x[:, 8:9], kv_cache=prefill).logits[:, -1]
        torch.testing.assert_close(step, out[:, 8], atol=1e-4, rtol=0)


def test_groups_map_to_every_attention_kinds_projections():
    mods, params = lora.target_names(_model(MLA), ["attention"])
    assert sorted(m.split(".")[-1] for m in mods if m.startswith("blocks.0.")) == [
        "kv_down", "kv_up", "proj", "q_down", "q_up"]
    assert params == []
    mods, params = lora.target_names(_model(KINDS["moe"][0]), ["mlp", "experts", "router"])
    assert "blocks.0.ffn.shared.up" in mods and "blocks.0.ffn.router" in mods
    assert params[:2] == ["blocks.0.ffn.experts.w_up", "blocks.0.ffn.experts.w_down"]
    with pytest.raises(LlmctlError, match="experts match"):
        lora.target_names(_model({}), ["attention", "experts"])


def test_a_missing_peft_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(LlmctlError, match=r"pip install -e '\.\[finetune\]'"):
        lora.require_peft()


def test_aux_free_routing_biases_travel_with_the_adapter():
    layer = {**MOE_LAYER, "coeff": None, "aux_free": True, "alpha": 0.01, "gamma": 0.01}
    extra = {"layer_configs": json.dumps([layer]), "n_layer": None}
    model = _model(extra)
    lora.attach(model, rank=2, alpha=4, dropout=0.0, groups=["attention"])
    with torch.no_grad():
        model.blocks[0].ffn.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    saved = {k: v.clone() for k, v in lora.adapter_tensors(model, None).items()}
    assert torch.equal(saved["blocks.0.ffn.expert_bias"], torch.tensor([0.1, -0.2, 0.3]))
    fresh = _model(extra)
    lora.attach(fresh, rank=2, alpha=4, dropout=0.0, groups=["attention"])
    lora.load_adapter_tensors(fresh, saved, None, "test")
    assert torch.equal(fresh.blocks[0].ffn.expert_bias, saved["blocks.0.ffn.expert_bias"])
    with pytest.raises(LlmctlError, match="missing blocks.0.ffn.expert_bias"):
        lora.load_adapter_tensors(fresh, {k: v for k, v in saved.items()
                                          if "bias" not in k}, None, "test")


GOOD_ADAPTER = {"peft_type": "LORA", "r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0,
                "targets": ["attention"], "base": {}, "added_token_rows": None}


@pytest.mark.parametrize("field, value, reason", [
    ("r", "4", "r must be a whole number >= 1, got '4'"),
    ("r", 0, "r must be a whole number >= 1"),
    ("lora_alpha", None, "lora_alpha must be a finite number"),
    ("lora_alpha", float("inf"), "lora_alpha must be a finite number"),
    ("targets", ["attention", "embeddings"], "targets must be a list of attention, mlp"),
    ("targets", "attention", "targets must be a list of"),
    ("added_token_rows", [5, 2], "added_token_rows must be null or [first, end)"),
])
def test_an_adapter_config_is_checked_as_data(field, value, reason, tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / lora.ADAPTER_WEIGHTS)
    (tmp_path / lora.ADAPTER_CONFIG).write_text(json.dumps({**GOOD_ADAPTER, field: value}))
    with pytest.raises(LlmctlError, match="adapter config .* is not valid") as err:
        lora.read_adapter(tmp_path)
    assert reason in str(err.value)
    (tmp_path / lora.ADAPTER_CONFIG).write_text(json.dumps(GOOD_ADAPTER))
    config, tensors = lora.read_adapter(tmp_path)  # the good one passes
    assert config["r"] == 4 and set(tensors) == {"x"}
