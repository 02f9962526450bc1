"""GPT-2 (`GPT2LMHeadModel`): learned positions, LayerNorm, a plain MLP, multi-head attention.

GPT-2's linears are Conv1D (weights stored (in, out), so transposed) and carry biases; llmctl
has none, so they export as zeros and import only when zero."""

from __future__ import annotations

from typing import Any

import torch

from ..config.schema import BlockConfig, LLMConfig
from ..model.norm import NORM_EPS
from .adapter import (
    Adapter,
    StateDict,
    check_eps,
    head_dim_problem,
    llm_config,
    refuse,
    same_layers,
)

# llmctl non_linearity -> transformers ACT2FN name computing exactly the same function
ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu",
               "silu": "silu", "swish": "silu", "tanh": "tanh", "sigmoid": "sigmoid"}
_FROM_ACT = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
             "relu": "relu", "silu": "silu", "swish": "silu", "tanh": "tanh",
             "sigmoid": "sigmoid"}


def problems(config: LLMConfig) -> list[str]:
    found = same_layers(config) + head_dim_problem(config)
    if config.pos_emb != "learn":
        found.append(f"pos_emb={config.pos_emb} (GPT-2 has learned positions)")
    if config.norm != "layer":
        found.append(f"norm={config.norm} (GPT-2 has LayerNorm)")
    layer = config.layers[0]
    if layer.attn != "mha":
        found.append(f"attn={layer.attn} (GPT-2 has multi-head attention)")
    if layer.moe:
        found.append("moe (GPT-2 has a dense MLP)")
    if layer.non_linearity not in ACTIVATIONS:
        found.append(f"non_linearity={layer.non_linearity} (GPT-2 takes "
                     f"{', '.join(ACTIVATIONS)})")
    return found


def to_hf_config(config: LLMConfig, vocab: int) -> dict[str, Any]:
    layer = config.layers[0]
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocab,
            "n_positions": config.block_size, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": layer.n_head, "n_inner": layer.up_dim,
            "activation_function": ACTIVATIONS[layer.non_linearity],
            "layer_norm_epsilon": NORM_EPS, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True}


def to_hf(sd: StateDict, config: LLMConfig) -> StateDict:
    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"],
           "transformer.ln_f.weight": sd["norm_f.weight"],
           "transformer.ln_f.bias": sd["norm_f.bias"]}
    for i in range(config.n_layer):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
            out[dst + b + ".weight"] = sd[src + a + ".weight"]
            out[dst + b + ".bias"] = sd[src + a + ".bias"]
        for a, b in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                     ("ffn.up", "mlp.c_fc"), ("ffn.down", "mlp.c_proj")):
            w = sd[src + a + ".weight"]  # (out, in)
            out[dst + b + ".weight"] = w.t().contiguous()  # Conv1D: (in, out)
            out[dst + b + ".bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    return out


def from_hf_config(hf: dict[str, Any]) -> LLMConfig:
    found: list[str] = []
    act = hf.get("activation_function", "gelu_new")
    if act not in _FROM_ACT:
        found.append(f"activation_function={act!r} (llmctl takes {', '.join(_FROM_ACT)})")
    check_eps(hf, "layer_norm_epsilon", found)
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        found.append("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn")
    if hf.get("scale_attn_weights", True) is False:
        found.append("scale_attn_weights=false")
    if hf.get("tie_word_embeddings", True) is False:
        found.append("untied input and output embeddings (llmctl ties them)")
    refuse("GPT-2", found)
    C = int(hf["n_embd"])
    layer = BlockConfig(attn="mha", n_head=int(hf["n_head"]), n_kv_heads=int(hf["n_head"]),
                        up_dim=int(hf.get("n_inner") or 4 * C), non_linearity=_FROM_ACT[act])
    return llm_config(n_embd=C, vocab=int(hf["vocab_size"]), block_size=int(hf["n_positions"]),
                      pos_emb="learn", norm="layer", theta=10000.0,
                      layers=[BlockConfig(**vars(layer)) for _ in range(int(hf["n_layer"]))])


def from_hf(sd: StateDict, config: LLMConfig, hf: dict[str, Any]) -> StateDict:
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    biases = {k: v for k, v in sd.items()
              if k.endswith(".bias") and ".ln_" not in k and k.startswith("h.")}
    # == 0 everywhere, not max(|v|) > 0: a NaN bias is not zero either
    bad = [f"{k} is empty" if v.numel() == 0 else
           f"{k} is not zero (llmctl's linears have no bias)"
           for k, v in biases.items() if v.numel() == 0 or not bool((v == 0).all())]
    refuse("GPT-2", bad[:5])
    out = {"wte.weight": sd["wte.weight"], "wpe.weight": sd["wpe.weight"],
           "norm_f.weight": sd["ln_f.weight"], "norm_f.bias": sd["ln_f.bias"]}
    for i in range(config.n_layer):
        src, dst = f"h.{i}.", f"blocks.{i}."
        for a, b in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
            out[dst + a + ".weight"] = sd[src + b + ".weight"]
            out[dst + a + ".bias"] = sd[src + b + ".bias"]
        for a, b in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                     ("ffn.up", "mlp.c_fc"), ("ffn.down", "mlp.c_proj")):
            out[dst + a + ".weight"] = sd[src + b + ".weight"].t().contiguous()
    out["lm_head.weight"] = out["wte.weight"]
    return out


ADAPTER = Adapter("gpt2", "GPT2LMHeadModel", problems, to_hf_config, to_hf, from_hf_config,
                  from_hf)
