"""What every transformers family adapter provides, and the checks they share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..config.schema import BlockConfig, LLMConfig
from ..core.errors import LlmctlError
from ..model.norm import NORM_EPS

StateDict = dict[str, torch.Tensor]
# An adapter whose transformers weights are a rounded function of llmctl's (DeepSeek's
# rescaled latent projections) also returns the exact originals under this prefix; export
# writes them to EXACT_FILE beside model.safetensors (transformers ignores the file) and
# import hands them back under the same prefix, so a round trip can be bitwise.
EXACT_PREFIX = "llmctl_exact."
EXACT_FILE = "llmctl_exact.safetensors"


@dataclass(frozen=True)
class Adapter:
    """One transformers model family: when an llmctl config is exactly one of its models,
    and how configs and weights translate both ways."""

    name: str  # gpt2, llama, deepseek_v2, deepseek_v3
    architecture: str  # the transformers class, e.g. LlamaForCausalLM
    problems: Callable[[LLMConfig], list[str]]  # why the config is not exactly this family
    to_hf_config: Callable[[LLMConfig, int], dict[str, Any]]  # (config, vocab) -> config.json
    to_hf: Callable[[StateDict, LLMConfig], StateDict]
    from_hf_config: Callable[[dict[str, Any]], LLMConfig]  # raises LlmctlError when no fit
    from_hf: Callable[[StateDict, LLMConfig, dict[str, Any]], StateDict]  # + config.json


class ImportRefused(LlmctlError):
    """A transformers model outside llmctl's architecture space."""


def same_layers(config: LLMConfig) -> list[str]:
    if config.homogeneous:
        return []
    return ["layers differ from one another (per-layer configs)"]


def check_eps(hf: dict[str, Any], key: str, problems: list[str]) -> None:
    eps = hf.get(key, NORM_EPS)
    if abs(float(eps) - NORM_EPS) > 1e-12:
        problems.append(f"{key}={eps} (llmctl's norms use eps {NORM_EPS})")


def refuse(family: str, problems: list[str]) -> None:
    if problems:
        raise ImportRefused(f"this {family} model does not fit llmctl's architecture space:\n  "
                            + "\n  ".join(problems))


def rope_theta(hf: dict[str, Any]) -> float:
    """The RoPE base of a config.json (transformers 5: rope_parameters; 4: rope_theta);
    scaled RoPE variants (yarn, linear, ...) are not llmctl's."""
    params = hf.get("rope_parameters") or {}
    kind = params.get("rope_type", "default")
    if kind != "default" or hf.get("rope_scaling"):
        raise ImportRefused(f"RoPE scaling {kind or hf.get('rope_scaling')!r} is not supported "
                            "(llmctl has plain RoPE)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def rope_config(theta: float) -> dict[str, Any]:
    return {"rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "rope_theta": theta}


def llm_config(*, n_embd: int, vocab: int, block_size: int, pos_emb: str, norm: str,
               theta: float, layers: list[BlockConfig]) -> LLMConfig:
    return LLMConfig(n_layer=len(layers), n_embd=n_embd, vocab_size=vocab,
                     block_size=block_size, pos_emb=pos_emb, norm=norm, rope_theta=theta,
                     layers=layers)


def head_dim_problem(config: LLMConfig) -> list[str]:
    heads = config.layers[0].n_head
    if config.n_embd % heads:
        return [f"n_embd={config.n_embd} is not a multiple of n_head={heads}"]
    return []
