"""What a config costs: parameters (total / active), training FLOPs, KV cache and memory.

The model is built on the `meta` device, so parameter counts are those of the real model
(every attention and FFN kind) and a 7B config inspects in well under a second.

Formulas (per token, T = block_size, C = n_embd, V = vocab_size):
- Training FLOPs = 6 * (active non-embedding params + V * C) + sum over layers of the
  attention term. The V * C term is the tied LM-head matmul (the embedding lookup itself is
  free). Attention term (fwd + bwd = 3 x fwd; QK^T and AV over the full T x T, as in the
  PaLM / nanoGPT MFU formulas): 6 * n_head * T * (d_qk + d_v); mha / mqa / gqa: d_qk = d_v
  = head_dim, i.e. 12 * C * T (KV heads do not change it); mla: d_qk = head_dim +
  rope_head_dim, d_v = head_dim.
- KV cache numbers per token per layer: mha / mqa / gqa 2 * kv_heads * head_dim; mla
  kv_latent_dim (+ rope_head_dim with RoPE).
- Training memory (rough): fp32 weights 4 B, grads 4 B and AdamW moments 8 B per
  parameter, plus activations: the tensors autograd keeps for backward, counted per token
  for each layer kind, times batch_size * block_size; with act_recomp only each block's
  input is kept, plus one block's activations while it is recomputed.
- Multi-token prediction (mtp_depth D): each module's parameters (projection, norms, one
  block like the last layer) count as total and active; its training FLOPs per token are
  those of one more layer plus its projection and one more LM-head matmul (V * C), counted
  over the full block_size (the module sees T - k positions, a small overestimate). The MTP
  modules' activations are not in the memory estimate.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import torch

from ..config.schema import BlockConfig, LLMConfig, TrainConfig
from . import LLM
from .mlp import is_gated

FLOPS_FORMULA = ("6 * (active non-embedding params + (1 + mtp_depth) * vocab_size * n_embd) "
                 "+ sum over layers (and MTP blocks) of 6 * n_head * block_size * (d_qk + d_v)")


def build_meta_model(cfg: LLMConfig) -> LLM:
    """The real module tree with no storage behind its tensors."""
    with torch.device("meta"):
        return LLM(cfg)


def parameter_counts(cfg: LLMConfig) -> dict[str, Any]:
    """Parameter counts of the real module tree: total, embedding, final norm and each
    layer's. Counted once per distinct config (the trainer's MFU, inspect-params and the
    benchmarks ask again and again), on the meta device."""
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    if key not in _COUNTS:
        model = build_meta_model(cfg)
        total = model.num_params()
        if len(_COUNTS) >= 64:
            _COUNTS.pop(next(iter(_COUNTS)))
        _COUNTS[key] = {"total": total, "final_norm": _numel(model.norm_f),
                        "embedding": total - model.num_params(exclude_embeddings=True),
                        "layers": [_layer_params(block) for block in model.blocks],
                        "mtp": [_mtp_params(module) for module in model.mtp]}
    return copy.deepcopy(_COUNTS[key])


_COUNTS: dict[str, dict[str, Any]] = {}  # config JSON -> counts


def _numel(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _layer_params(block: torch.nn.Module) -> dict[str, int]:
    """Parameter counts of one block; `ffn_active` counts the routed experts a token uses."""
    ffn = block.ffn
    out = {"attention": _numel(block.attn),
           "norms": _numel(block.attn_norm) + _numel(block.ffn_norm),
           "ffn": _numel(ffn)}
    if hasattr(ffn, "experts"):  # MoE
        per_expert = ffn.experts.w_up[0].numel() + ffn.experts.w_down[0].numel()
        out.update(router=_numel(ffn.router), shared_experts=_numel(ffn.shared),
                   routed_experts=_numel(ffn.experts), routed_per_expert=per_expert,
                   ffn_active=out["ffn"] - (ffn.n_routed - ffn.top_k) * per_expert)
    else:
        out["ffn_active"] = out["ffn"]
    out["total"] = out["attention"] + out["norms"] + out["ffn"]
    out["active"] = out["attention"] + out["norms"] + out["ffn_active"]
    return out


def _mtp_params(module: torch.nn.Module) -> dict[str, int]:
    """One MTP module: its block's counts plus the projection and the three norms."""
    block = _layer_params(module.block)
    extra = module.proj.weight.numel() + sum(
        _numel(norm) for norm in (module.hidden_norm, module.embed_norm, module.norm_f))
    return {"block": block["total"], "projection_and_norms": extra,
            "total": block["total"] + extra, "active": block["active"] + extra}


def kv_numbers_per_token(block: BlockConfig, cfg: LLMConfig) -> int:
    """Numbers one layer caches per token (per sequence)."""
    if block.attn == "mla":
        return (int(block.kv_latent_dim)
                + (int(block.rope_head_dim or 0) if cfg.pos_emb == "rope" else 0)
                + (block.n_head if block.qk_norm else 0))  # + one key scale per head
    return 2 * block.kv_heads * (cfg.n_embd // block.n_head)


def _attention_dims(block: BlockConfig, cfg: LLMConfig) -> tuple[int, int]:
    """(d_qk, d_v) per head."""
    hd = cfg.n_embd // block.n_head
    if block.attn == "mla" and cfg.pos_emb == "rope":
        return hd + int(block.rope_head_dim or 0), hd
    return hd, hd


def _flops(cfg: LLMConfig, active_non_embedding: int) -> float:
    attention = 0
    head = cfg.vocab_size * cfg.n_embd * (1 + cfg.mtp_depth)  # one LM-head matmul per depth
    for block in [*cfg.layers, *[cfg.layers[-1]] * cfg.mtp_depth]:
        d_qk, d_v = _attention_dims(block, cfg)
        attention += 6 * block.n_head * cfg.block_size * (d_qk + d_v)
    return float(6 * (active_non_embedding + head) + attention)


def training_flops_per_token(cfg: LLMConfig) -> float:
    """Training (forward + backward) FLOPs per token; see the module docstring."""
    return inspect_model(cfg)["flops"]["training_per_token"]


# ---------------------------------------------------------------- activation memory


def _block_activations(block: BlockConfig, cfg: LLMConfig) -> int:
    """Numbers autograd keeps per token for one block (dropout masks excluded)."""
    C, H = cfg.n_embd, block.n_head
    hd = C // H
    n = 4 * C + H  # both norms' inputs and outputs; the attention log-sum-exp
    if block.attn == "mla":
        r = int(block.rope_head_dim or 0) if cfg.pos_emb == "rope" else 0
        q_lat, kv_lat = int(block.q_latent_dim), int(block.kv_latent_dim)
        n += 2 * q_lat + (kv_lat + r) + kv_lat  # latents before / after their norms
        n += 2 * H * hd  # decompressed k_nope | v
        # with RoPE: q, k, zero-padded v and the output are hd + r wide, then sliced
        n += 4 * H * (hd + r) + H * hd if r else 2 * H * hd
    else:
        kv = block.kv_heads * hd
        n += C + 2 * kv + C  # fused q | k | v projection and the attention output
        if cfg.pos_emb == "rope":
            n += C + kv  # rotated q and k
    n += _ffn_activations(block, C)
    return n


def _mlp_activations(hidden: int, non_linearity: str) -> int:
    # up-projection output, activation output; gated: the activated gate too
    return (3 if is_gated(non_linearity) else 1) * hidden + hidden


def _ffn_activations(block: BlockConfig, C: int) -> int:
    if not block.moe:
        return _mlp_activations(block.up_dim, block.non_linearity)
    k = block.n_routed_act
    n = 2 * (int(block.n_exp) - int(block.n_shared))  # router logits and scores (fp32)
    n += k * (3 * C + _mlp_activations(block.up_dim, block.non_linearity))  # gathered in/out
    if block.n_shared:
        n += C + _mlp_activations(int(block.n_shared) * block.up_dim, block.non_linearity)
    return n


def memory_estimate(cfg: LLMConfig, train: TrainConfig, n_params: int,
                    act_bytes: int = 4) -> dict[str, Any]:
    """Bytes for weights, grads, AdamW states and activations (with / without act_recomp);
    `act_bytes` per activation number (runtime.device.activation_bytes gives the trainer's)."""
    tokens = train.batch_size * cfg.block_size
    per_layer = [_block_activations(b, cfg) for b in cfg.layers]
    # embeddings out, final norm in / out, the fp32 log-probabilities of the cross-entropy
    edges = 3 * cfg.n_embd * act_bytes + cfg.vocab_size * 4
    full = tokens * (sum(per_layer) * act_bytes + edges)
    recomp = tokens * ((len(per_layer) * cfg.n_embd + max(per_layer)) * act_bytes + edges)
    states = {"weights": 4 * n_params, "grads": 4 * n_params, "adamw_states": 8 * n_params}
    base = sum(states.values())
    return {
        "batch_size": train.batch_size, "block_size": cfg.block_size,
        "activation_bytes_per_number": act_bytes, **states,
        "activations": full, "activations_act_recomp": recomp,
        "total": base + full, "total_act_recomp": base + recomp,
    }


# ---------------------------------------------------------------- the report


def inspect_model(cfg: LLMConfig, train: TrainConfig | None = None,
                  kv_bytes_per_number: int = 2, activation_bytes: int = 4) -> dict[str, Any]:
    """The full, JSON-able report for a model config (memory only when `train` is given).

    KV-cache bytes assume `kv_bytes_per_number` bytes per cached number (2: bf16 / fp16).
    """
    counts = parameter_counts(cfg)
    layers = []
    for i, (block_cfg, params) in enumerate(zip(cfg.layers, counts["layers"], strict=True)):
        entry = {"index": i, "attn": block_cfg.attn, "ffn_kind": block_cfg.ffn_kind, **params}
        numbers = kv_numbers_per_token(block_cfg, cfg)
        entry["kv_cache_numbers_per_token"] = numbers
        entry["kv_cache_bytes_per_token"] = numbers * kv_bytes_per_number
        layers.append(entry)
    total, embedding, final_norm = counts["total"], counts["embedding"], counts["final_norm"]
    non_embedding = total - embedding
    mtp = counts["mtp"]
    active_non_embedding = (final_norm + sum(layer["active"] for layer in layers)
                            + sum(module["active"] for module in mtp))
    kv_per_token = sum(layer["kv_cache_bytes_per_token"] for layer in layers)
    report: dict[str, Any] = {
        "model": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size,
                  "block_size": cfg.block_size, "pos_emb": cfg.pos_emb, "norm": cfg.norm},
        "params": {
            "total": total,
            "active_per_token": embedding + active_non_embedding,
            "embedding": embedding,
            "non_embedding": non_embedding,
            "active_non_embedding": active_non_embedding,
            "final_norm": final_norm,
        },
        "layers": layers,
        "mtp": {"depth": cfg.mtp_depth, "weight": cfg.mtp_weight, "modules": mtp,
                "params": sum(module["total"] for module in mtp)},
        "flops": {"training_per_token": _flops(cfg, active_non_embedding),
                  "formula": FLOPS_FORMULA},
        "kv_cache": {
            "bytes_per_number": kv_bytes_per_number,
            "bytes_per_token": kv_per_token,
            "bytes_full_context": kv_per_token * cfg.block_size,
            "context": cfg.block_size,
        },
    }
    if train is not None:
        report["memory"] = memory_estimate(cfg, train, total, activation_bytes)
    return report


# ---------------------------------------------------------------- inference memory


def inference_bytes(cfg: LLMConfig, batch_size: int, tokens: int, act_bytes: int = 4,
                    all_logits: bool = True, kv_cache: bool = False) -> dict[str, int]:
    """Peak bytes, beyond the weights, of one no-grad forward of (batch_size, tokens): the
    residual stream and the widest block's intermediates, the logits (B×T×V at `act_bytes`,
    their fp32 copy and log-softmax for the loss; B×V when only the last position's are
    kept) and, with `kv_cache`, the cache of a full block_size context."""
    per_token = (2 * cfg.n_embd + max(_block_activations(b, cfg) for b in cfg.layers))
    activations = batch_size * tokens * per_token * act_bytes
    logit_rows = batch_size * (tokens if all_logits else 1)
    logits = logit_rows * cfg.vocab_size * (act_bytes + (8 if all_logits else 4))
    cache = 0
    if kv_cache:
        numbers = sum(kv_numbers_per_token(b, cfg) for b in cfg.layers)
        cache = 2 * batch_size * cfg.block_size * numbers * act_bytes  # grows by doubling
    return {"activations": activations, "logits": logits, "kv_cache": cache,
            "total": activations + logits + cache}
