"""Llama (`LlamaForCausalLM`): RoPE, RMSNorm, SwiGLU, multi-head / multi-query / grouped-query
attention.

llmctl's RoPE rotates the pairs (i, i + d/2) (rotate-half), as transformers' Llama does, so
q/k rows map without a permutation (Meta's original interleaved checkpoints are the ones
transformers permutes when converting)."""

from __future__ import annotations

from typing import Any

from ..config.schema import BlockConfig, LLMConfig
from ..model.norm import NORM_EPS
from .adapter import (
    Adapter,
    StateDict,
    check_eps,
    head_dim_problem,
    llm_config,
    refuse,
    rope_config,
    rope_theta,
    same_layers,
)

ATTN = ("mha", "mqa", "gqa")


def problems(config: LLMConfig) -> list[str]:
    found = same_layers(config) + head_dim_problem(config)
    if config.pos_emb != "rope":
        found.append(f"pos_emb={config.pos_emb} (Llama has RoPE)")
    if config.norm != "rms":
        found.append(f"norm={config.norm} (Llama has RMSNorm)")
    layer = config.layers[0]
    if layer.attn not in ATTN:
        found.append(f"attn={layer.attn} (Llama has mha / mqa / gqa)")
    if layer.moe:
        found.append("moe (Llama has a dense MLP)")
    if layer.non_linearity != "swiglu":
        found.append(f"non_linearity={layer.non_linearity} (Llama has swiglu)")
    return found


def to_hf_config(config: LLMConfig, vocab: int) -> dict[str, Any]:
    layer = config.layers[0]
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
            "hidden_size": config.n_embd, "intermediate_size": layer.up_dim,
            "num_hidden_layers": config.n_layer, "num_attention_heads": layer.n_head,
            "num_key_value_heads": layer.kv_heads, "head_dim": config.n_embd // layer.n_head,
            "hidden_act": "silu", "max_position_embeddings": config.block_size,
            "rms_norm_eps": NORM_EPS, "attention_bias": False, "mlp_bias": False,
            "attention_dropout": 0.0, "tie_word_embeddings": True,
            **rope_config(config.rope_theta)}


def to_hf(sd: StateDict, config: LLMConfig) -> StateDict:
    layer = config.layers[0]
    C, kv = config.n_embd, layer.kv_heads * (config.n_embd // layer.n_head)
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["norm_f.weight"]}
    for i in range(config.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = sd[src + "attn.qkv.weight"].split([C, kv, kv])
        gate, up = sd[src + "ffn.up.weight"].chunk(2)
        out |= {dst + "input_layernorm.weight": sd[src + "attn_norm.weight"],
                dst + "post_attention_layernorm.weight": sd[src + "ffn_norm.weight"],
                dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
                dst + "self_attn.v_proj.weight": v,
                dst + "self_attn.o_proj.weight": sd[src + "attn.proj.weight"],
                dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
                dst + "mlp.down_proj.weight": sd[src + "ffn.down.weight"]}
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_config(hf: dict[str, Any]) -> LLMConfig:
    found: list[str] = []
    check_eps(hf, "rms_norm_eps", found)
    if hf.get("hidden_act", "silu") != "silu":
        found.append(f"hidden_act={hf.get('hidden_act')!r} (llmctl's swiglu gates with silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        found.append("attention_bias / mlp_bias (llmctl's linears have no bias)")
    if hf.get("tie_word_embeddings") is False:
        found.append("untied input and output embeddings (llmctl ties them)")
    C, H = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or C // H
    if head_dim * H != C:
        found.append(f"head_dim={head_dim} * heads={H} != hidden_size={C}")
    theta = rope_theta(hf)
    refuse("Llama", found)
    kv = int(hf.get("num_key_value_heads") or H)
    attn = "mha" if kv == H else "mqa" if kv == 1 else "gqa"
    layers = [BlockConfig(attn=attn, n_head=H, n_kv_heads=kv, up_dim=int(hf["intermediate_size"]),
                          non_linearity="swiglu") for _ in range(int(hf["num_hidden_layers"]))]
    return llm_config(n_embd=C, vocab=int(hf["vocab_size"]),
                      block_size=int(hf["max_position_embeddings"]), pos_emb="rope", norm="rms",
                      theta=theta, layers=layers)


def from_hf(sd: StateDict, config: LLMConfig, hf: dict[str, Any]) -> StateDict:
    import torch

    out = {"wte.weight": sd["model.embed_tokens.weight"], "norm_f.weight": sd["model.norm.weight"]}
    for i in range(config.n_layer):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        a = src + "self_attn."
        out |= {dst + "attn_norm.weight": sd[src + "input_layernorm.weight"],
                dst + "ffn_norm.weight": sd[src + "post_attention_layernorm.weight"],
                dst + "attn.qkv.weight": torch.cat([sd[a + "q_proj.weight"],
                                                    sd[a + "k_proj.weight"],
                                                    sd[a + "v_proj.weight"]]),
                dst + "attn.proj.weight": sd[a + "o_proj.weight"],
                dst + "ffn.up.weight": torch.cat([sd[src + "mlp.gate_proj.weight"],
                                                  sd[src + "mlp.up_proj.weight"]]),
                dst + "ffn.down.weight": sd[src + "mlp.down_proj.weight"]}
    out["lm_head.weight"] = out["wte.weight"]
    return out


ADAPTER = Adapter("llama", "LlamaForCausalLM", problems, to_hf_config, to_hf, from_hf_config,
                  from_hf)
