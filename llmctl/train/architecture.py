"""Which model settings make up the architecture (a shape, or a kind of computation), and
how two configs differ in them: resume and init_from both refuse such differences."""

from __future__ import annotations

import dataclasses

from ..config import BlockConfig, LLMConfig

# Model settings that do not change the architecture (a resume may change them).
_NOT_ARCHITECTURE = {"dropout", "init_std", "layers"}
# coeff / alpha / gamma weigh the balancing losses and bias steps: tunable on resume.
# aux_free is not: it switches the router's scoring (and its bias buffer).
_MOE_KEYS = ("n_exp", "n_shared", "n_act", "aux_free")


def _block_view(block: BlockConfig) -> dict[str, object]:
    """The settings of a block that matter for its kind (gqa ignores q_latent_dim, ...)."""
    view = {"attn": block.attn, "n_head": block.n_head, "kv_heads": block.kv_heads,
            "moe": block.moe, "up_dim": block.up_dim, "non_linearity": block.non_linearity}
    if block.attn == "mla":
        view.update(q_latent_dim=block.q_latent_dim, kv_latent_dim=block.kv_latent_dim,
                    rope_head_dim=block.rope_head_dim)
    if block.moe:
        view.update({key: getattr(block, key) for key in _MOE_KEYS})
    return view


def architecture_differences(saved: LLMConfig, current: LLMConfig) -> list[str]:
    """Human-readable architecture differences between two model configs (empty: same)."""
    out = []
    for f in dataclasses.fields(LLMConfig):
        if f.name in _NOT_ARCHITECTURE:
            continue
        a, b = getattr(saved, f.name), getattr(current, f.name)
        if a != b:
            out.append(f"{f.name}: checkpoint {a!r}, now {b!r}")
    if len(saved.layers) == len(current.layers):
        for i, (a, b) in enumerate(zip(saved.layers, current.layers, strict=True)):
            va, vb = _block_view(a), _block_view(b)
            out += [f"layers[{i}].{key}: checkpoint {va.get(key)!r}, now {vb.get(key)!r}"
                    for key in dict.fromkeys([*va, *vb]) if va.get(key) != vb.get(key)]
    return out
