"""DeepSeek (`DeepseekV2ForCausalLM`, `DeepseekV3ForCausalLM`): multi-head latent attention
with decoupled RoPE, RMSNorm, SwiGLU, dense layers then MoE layers with shared experts.

V2: softmax routing, top-k gates unnormalised (llmctl's standard MoE with the aux loss).
V3: sigmoid routing with a score-correction bias for selection, gates normalised
(llmctl's aux_free MoE); one expert group so group-limited routing is plain top-k.

llmctl's RoPE rotates pairs (i, i + r/2). DeepSeek-V2 in transformers rotates interleaved
pairs (2i, 2i + 1), so the rotary rows of q_b_proj and kv_a_proj_with_mqa are permuted;
V3 is exported with rope_interleave=false (rotate-half), which needs no permutation.
transformers' latent norms (q_a_layernorm, kv_a_layernorm) hard-code eps 1e-6; llmctl's
use the block's `latent_norm_eps` (default 1e-5; import sets 1e-6, so a transformers model's
weights are copied unscaled and a model trained from it exports unscaled: bitwise both ways).
For another eps, RMSNorm's scale invariance up to eps (norm(s*x; s^2*eps) = norm(x; eps))
makes export scale the weights feeding the latent norms by sqrt(1e-6 / eps) and record the
eps (`llmctl_latent_norm_eps`), which import reads to scale back. Scaling rounds, so export
also keeps the unscaled originals (adapter.EXACT_FILE); import uses them while the folder's
weights are still exactly their scaled copies (a bitwise round trip), else scales back."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..config.schema import BlockConfig, LLMConfig
from ..model.norm import NORM_EPS
from .adapter import (
    EXACT_PREFIX,
    Adapter,
    StateDict,
    check_eps,
    head_dim_problem,
    llm_config,
    refuse,
    rope_config,
    rope_theta,
)

HF_LATENT_EPS = 1e-6  # hard-coded in transformers' DeepSeek attention
EPS_KEY = "llmctl_latent_norm_eps"  # config.json: the eps of an llmctl export's latent norms
_ATTN_KEYS = ("n_head", "q_latent_dim", "kv_latent_dim", "rope_head_dim", "latent_norm_eps")


def latent_scale(eps: float) -> float:
    """What the weights feeding an eps-`eps` latent norm are multiplied by for transformers
    (exactly 1.0 for eps 1e-6)."""
    return 1.0 if eps == HF_LATENT_EPS else math.sqrt(HF_LATENT_EPS / eps)


def _scaled(w: torch.Tensor, scale: float, inverse: bool = False) -> torch.Tensor:
    if scale == 1.0:
        return w  # no arithmetic: bitwise
    return w / scale if inverse else w * scale


def _unscaled(sd: StateDict, hf_key: str, ours: str, rows: slice, scale: float) -> torch.Tensor:
    """llmctl's weight from the rescaled transformers rows: the exported original when the
    rows are still exactly its scaled copy (not changed since export), else scaled back."""
    w = sd[hf_key][rows]
    exact = sd.get(EXACT_PREFIX + ours)
    if (exact is not None and exact.shape == w.shape
            and torch.equal(_scaled(exact, scale).to(w.dtype), w)):
        return exact
    return _scaled(w, scale, inverse=True)
_MOE_KEYS = ("up_dim", "n_exp", "n_shared", "n_act", "aux_free")


def _split(config: LLMConfig) -> tuple[list[BlockConfig], list[BlockConfig]]:
    dense = [layer for layer in config.layers if not layer.moe]
    return dense, [layer for layer in config.layers if layer.moe]


def _problems(config: LLMConfig, version: int) -> list[str]:
    found = head_dim_problem(config)
    if config.pos_emb != "rope":
        found.append(f"pos_emb={config.pos_emb} (DeepSeek has RoPE)")
    if config.norm != "rms":
        found.append(f"norm={config.norm} (DeepSeek has RMSNorm)")
    first = config.layers[0]
    for i, layer in enumerate(config.layers):
        if layer.attn != "mla":
            found.append(f"layers[{i}].attn={layer.attn} (DeepSeek has mla in every layer)")
        elif any(getattr(layer, k) != getattr(first, k) for k in _ATTN_KEYS):
            found.append(f"layers[{i}] has other MLA sizes than layers[0]")
        if layer.non_linearity != "swiglu":
            found.append(f"layers[{i}].non_linearity={layer.non_linearity} (DeepSeek has swiglu)")
    if first.attn == "mla" and not first.rope_head_dim:
        found.append("mla without rope_head_dim")
    dense, moe = _split(config)
    if any(layer.moe for layer in config.layers[:len(dense)]):
        found.append("MoE layers before dense ones (DeepSeek stacks dense first, then MoE)")
    if len({layer.up_dim for layer in dense}) > 1:
        found.append("dense layers of different up_dim")
    if moe and any(any(getattr(m, k) != getattr(moe[0], k) for k in _MOE_KEYS) for m in moe):
        found.append("MoE layers with different expert settings")
    if moe and not moe[0].n_shared:
        found.append("MoE without shared experts (DeepSeek always has some)")
    if version == 2 and moe and moe[0].aux_free:
        found.append("aux_free routing (that is DeepSeek-V3)")
    if version == 3 and not moe:
        found.append("no MoE layer (a dense MLA model is DeepSeek-V2)")
    if version == 3 and moe and not moe[0].aux_free:
        found.append("softmax routing with the aux loss (that is DeepSeek-V2)")
    if version == 3 and moe and moe[0].n_routed_act and (moe[0].n_exp - moe[0].n_shared) < 2:
        found.append("fewer than 2 routed experts (V3's group routing needs 2)")
    return found


def _interleave(r: int) -> torch.Tensor:
    """HF row 2j is llmctl row j, HF row 2j+1 is llmctl row j + r/2."""
    half = torch.arange(r // 2)
    return torch.stack((half, half + r // 2), dim=1).reshape(-1)


def _to_hf_config(config: LLMConfig, vocab: int, version: int) -> dict[str, Any]:
    dense, moe = _split(config)
    first = config.layers[0]
    hd, r = config.n_embd // first.n_head, first.rope_head_dim
    out = {"model_type": f"deepseek_v{version}",
           "architectures": [f"DeepseekV{version}ForCausalLM"], "vocab_size": vocab,
           "hidden_size": config.n_embd, "num_hidden_layers": config.n_layer,
           "num_attention_heads": first.n_head, "num_key_value_heads": first.n_head,
           "q_lora_rank": first.q_latent_dim, "kv_lora_rank": first.kv_latent_dim,
           "qk_nope_head_dim": hd, "qk_rope_head_dim": r, "v_head_dim": hd, "head_dim": r,
           "intermediate_size": (dense or moe)[0].up_dim, "hidden_act": "silu",
           "max_position_embeddings": config.block_size, "rms_norm_eps": NORM_EPS,
           "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": True,
           "first_k_dense_replace": len(dense), "n_group": 1, "topk_group": 1,
           "routed_scaling_factor": 1.0, **rope_config(config.rope_theta)}
    if first.latent_norm_eps != HF_LATENT_EPS:  # weights rescaled: import scales them back
        out[EPS_KEY] = first.latent_norm_eps
    if moe:
        m = moe[0]
        out |= {"n_routed_experts": m.n_exp - m.n_shared, "n_shared_experts": m.n_shared,
                "num_experts_per_tok": m.n_routed_act, "moe_intermediate_size": m.up_dim}
    else:  # every layer dense: the MoE fields are unused but must be valid
        out |= {"n_routed_experts": 2, "n_shared_experts": 1, "num_experts_per_tok": 1,
                "moe_intermediate_size": dense[0].up_dim}
    if version == 2:
        out |= {"topk_method": "greedy", "norm_topk_prob": False, "mlp_bias": False}
    else:
        out |= {"norm_topk_prob": True, "rope_interleave": False, "num_nextn_predict_layers": 0}
    return out


def _mlp_to_hf(sd: StateDict, src: str, dst: str, out: StateDict) -> None:
    gate, up = sd[src + "up.weight"].chunk(2)
    out |= {dst + "gate_proj.weight": gate, dst + "up_proj.weight": up,
            dst + "down_proj.weight": sd[src + "down.weight"]}


def _to_hf(sd: StateDict, config: LLMConfig, version: int) -> StateDict:
    first = config.layers[0]
    H, hd, r, lat = first.n_head, config.n_embd // first.n_head, first.rope_head_dim, \
        first.kv_latent_dim
    perm = _interleave(r) if version == 2 else torch.arange(r)
    scale = latent_scale(first.latent_norm_eps)
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["norm_f.weight"]}
    for i, layer in enumerate(config.layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        a, b = src + "attn.", dst + "self_attn."
        q_up = sd[a + "q_up.weight"].view(H, hd + r, -1)
        q_up = torch.cat((q_up[:, :hd], q_up[:, hd:][:, perm]), dim=1).reshape(H * (hd + r), -1)
        kv_down = sd[a + "kv_down.weight"]
        if scale != 1.0:  # the originals of the rounded rows (see EXACT_PREFIX)
            out |= {EXACT_PREFIX + a + "q_down.weight": sd[a + "q_down.weight"],
                    EXACT_PREFIX + a + "kv_down.latent": kv_down[:lat]}
        kv_down = torch.cat((_scaled(kv_down[:lat], scale), kv_down[lat:][perm]))
        kv_up = sd[a + "kv_up.weight"].view(2, H, hd, lat).transpose(0, 1).reshape(2 * H * hd, lat)
        out |= {dst + "input_layernorm.weight": sd[src + "attn_norm.weight"],
                dst + "post_attention_layernorm.weight": sd[src + "ffn_norm.weight"],
                b + "q_a_proj.weight": _scaled(sd[a + "q_down.weight"], scale),
                b + "q_a_layernorm.weight": sd[a + "q_norm.weight"], b + "q_b_proj.weight": q_up,
                b + "kv_a_proj_with_mqa.weight": kv_down,
                b + "kv_a_layernorm.weight": sd[a + "kv_norm.weight"],
                b + "kv_b_proj.weight": kv_up, b + "o_proj.weight": sd[a + "proj.weight"]}
        f, m = src + "ffn.", dst + "mlp."
        if not layer.moe:
            _mlp_to_hf(sd, f, m, out)
            continue
        out |= {m + "gate.weight": sd[f + "router.weight"],
                m + "experts.gate_up_proj": sd[f + "experts.w_up"].transpose(1, 2),
                m + "experts.down_proj": sd[f + "experts.w_down"].transpose(1, 2)}
        _mlp_to_hf(sd, f + "shared.", m + "shared_experts.", out)
        if layer.aux_free:
            out[m + "gate.e_score_correction_bias"] = sd[f + "expert_bias"]
    return {k: v.contiguous() for k, v in out.items()}


def _from_hf_config(hf: dict[str, Any], version: int) -> LLMConfig:
    found: list[str] = []
    check_eps(hf, "rms_norm_eps", found)
    theta = rope_theta(hf)
    C, H = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    hd = C // H
    if hf.get("q_lora_rank") is None:
        found.append("q_lora_rank=null (llmctl's MLA always compresses the query)")
    if hd * H != C or hf.get("qk_nope_head_dim") != hd or hf.get("v_head_dim") != hd:
        found.append(f"qk_nope_head_dim={hf.get('qk_nope_head_dim')}, v_head_dim="
                     f"{hf.get('v_head_dim')} (llmctl needs both = hidden_size / heads = {hd})")
    if hf.get("hidden_act", "silu") != "silu":
        found.append(f"hidden_act={hf.get('hidden_act')!r} (llmctl's swiglu gates with silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        found.append("attention_bias / mlp_bias (llmctl's linears have no bias)")
    if hf.get("tie_word_embeddings") is False:
        found.append("untied input and output embeddings (llmctl ties them)")
    if float(hf.get("routed_scaling_factor", 1.0)) != 1.0:
        found.append(f"routed_scaling_factor={hf.get('routed_scaling_factor')} (llmctl: 1)")
    n_layer, k_dense = int(hf["num_hidden_layers"]), int(hf.get("first_k_dense_replace", 0))
    if k_dense < n_layer and int(hf.get("n_group") or 1) > 1 and \
            int(hf.get("topk_group") or 1) < int(hf.get("n_group")):
        found.append(f"group-limited routing (n_group={hf.get('n_group')}, topk_group="
                     f"{hf.get('topk_group')}); llmctl routes over all experts")
    if version == 2 and k_dense < n_layer and hf.get("topk_method", "greedy") != "greedy":
        found.append(f"topk_method={hf.get('topk_method')!r} (llmctl: greedy)")
    if version == 3 and k_dense < n_layer and hf.get("norm_topk_prob") is False:
        found.append("norm_topk_prob=false with sigmoid routing (llmctl normalises)")
    refuse(f"DeepSeek-V{version}", found)
    eps = hf.get(EPS_KEY, HF_LATENT_EPS)
    if not isinstance(eps, (int, float)) or not 0 < eps <= 0.1:
        refuse(f"DeepSeek-V{version}", [f"{EPS_KEY}={eps!r} (a positive number up to 0.1)"])
    attn = {"attn": "mla", "n_head": H, "n_kv_heads": H, "q_latent_dim": int(hf["q_lora_rank"]),
            "latent_norm_eps": float(eps),
            "kv_latent_dim": int(hf["kv_lora_rank"]),
            "rope_head_dim": int(hf["qk_rope_head_dim"]), "non_linearity": "swiglu"}
    layers = [BlockConfig(**attn, up_dim=int(hf["intermediate_size"])) for _ in range(k_dense)]
    routed, shared = int(hf["n_routed_experts"]), int(hf.get("n_shared_experts") or 0)
    moe = {"moe": True, "up_dim": int(hf["moe_intermediate_size"]), "n_exp": routed + shared,
           "n_shared": shared, "n_act": int(hf["num_experts_per_tok"]) + shared}
    moe |= ({"aux_free": True, "alpha": 1e-4, "gamma": 1e-3} if version == 3
            else {"coeff": 1e-2})
    layers += [BlockConfig(**attn, **moe) for _ in range(n_layer - k_dense)]
    return llm_config(n_embd=C, vocab=int(hf["vocab_size"]),
                      block_size=int(hf["max_position_embeddings"]), pos_emb="rope", norm="rms",
                      theta=theta, layers=layers)


def _stack_experts(sd: StateDict, m: str, n: int) -> None:
    """Per-expert checkpoints (experts.E.{gate,up,down}_proj.weight) to the fused form."""
    if m + "experts.gate_up_proj" in sd or m + "experts.0.gate_proj.weight" not in sd:
        return
    e = [f"{m}experts.{j}." for j in range(n)]
    sd[m + "experts.gate_up_proj"] = torch.stack(
        [torch.cat((sd[p + "gate_proj.weight"], sd[p + "up_proj.weight"])) for p in e])
    sd[m + "experts.down_proj"] = torch.stack([sd[p + "down_proj.weight"] for p in e])


def _from_hf(sd: StateDict, config: LLMConfig, hf: dict[str, Any], version: int) -> StateDict:
    first = config.layers[0]
    H, hd, r, lat = first.n_head, config.n_embd // first.n_head, first.rope_head_dim, \
        first.kv_latent_dim
    # V2 always rotates interleaved pairs; V3 unless rope_interleave=false (llmctl's exports)
    interleaved = version == 2 or hf.get("rope_interleave", True)
    inv = _interleave(r).argsort() if interleaved else torch.arange(r)
    scale = latent_scale(first.latent_norm_eps)
    sd = dict(sd)
    out = {"wte.weight": sd["model.embed_tokens.weight"], "norm_f.weight": sd["model.norm.weight"]}
    for i, layer in enumerate(config.layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        a, b = src + "self_attn.", dst + "attn."
        q_up = sd[a + "q_b_proj.weight"].view(H, hd + r, -1)
        q_up = torch.cat((q_up[:, :hd], q_up[:, hd:][:, inv]), dim=1).reshape(H * (hd + r), -1)
        kv_down = torch.cat((
            _unscaled(sd, a + "kv_a_proj_with_mqa.weight", b + "kv_down.latent", slice(0, lat),
                      scale), sd[a + "kv_a_proj_with_mqa.weight"][lat:][inv]))
        kv_up = sd[a + "kv_b_proj.weight"].view(H, 2, hd, lat).transpose(0, 1)
        out |= {dst + "attn_norm.weight": sd[src + "input_layernorm.weight"],
                dst + "ffn_norm.weight": sd[src + "post_attention_layernorm.weight"],
                b + "q_down.weight": _unscaled(sd, a + "q_a_proj.weight", b + "q_down.weight",
                                               slice(None), scale),
                b + "q_norm.weight": sd[a + "q_a_layernorm.weight"], b + "q_up.weight": q_up,
                b + "kv_down.weight": kv_down,
                b + "kv_norm.weight": sd[a + "kv_a_layernorm.weight"],
                b + "kv_up.weight": kv_up.reshape(2 * H * hd, lat),
                b + "proj.weight": sd[a + "o_proj.weight"]}
        m, f = src + "mlp.", dst + "ffn."
        shared = m + "shared_experts." if layer.moe else m
        target = f + "shared." if layer.moe else f
        out |= {target + "up.weight": torch.cat((sd[shared + "gate_proj.weight"],
                                                 sd[shared + "up_proj.weight"])),
                target + "down.weight": sd[shared + "down_proj.weight"]}
        if layer.moe:
            _stack_experts(sd, m, layer.n_exp - layer.n_shared)
            out |= {f + "router.weight": sd[m + "gate.weight"].float(),
                    f + "experts.w_up": sd[m + "experts.gate_up_proj"].transpose(1, 2),
                    f + "experts.w_down": sd[m + "experts.down_proj"].transpose(1, 2)}
            if layer.aux_free:
                out[f + "expert_bias"] = sd[m + "gate.e_score_correction_bias"].float()
    out["lm_head.weight"] = out["wte.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _adapter(version: int) -> Adapter:
    return Adapter(f"deepseek_v{version}", f"DeepseekV{version}ForCausalLM",
                   lambda c: _problems(c, version), lambda c, v: _to_hf_config(c, v, version),
                   lambda sd, c: _to_hf(sd, c, version), lambda hf: _from_hf_config(hf, version),
                   lambda sd, c, hf: _from_hf(sd, c, hf, version))


V2 = _adapter(2)
V3 = _adapter(3)
