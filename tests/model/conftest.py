"""Tiny model configs for the model tests (built through the real config loader)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llmctl.config import LLMConfig, load_config

TINY = dict(n_layer=2, n_embd=32, n_head=4, n_kv_heads=2, vocab_size=61, block_size=24,
            up_dim=48, q_latent_dim=16, kv_latent_dim=12, rope_head_dim=4)
MOE = dict(moe=True, n_exp=6, n_shared=1, n_act=3, coeff=0.01)
AUX_FREE = dict(moe=True, n_exp=6, n_shared=1, n_act=3, aux_free=True, alpha=0.01, gamma=0.01)

# Every attention kind and FFN kind in one stack, used by the heterogeneous tests.
MIXED_LAYERS = [
    {"attn": "mha", "n_head": 4, "moe": False, "up_dim": 48, "non_linearity": "gelu"},
    {"attn": "gqa", "n_head": 4, "n_kv_heads": 2, "moe": True, "up_dim": 24,
     "non_linearity": "swiglu", "n_exp": 5, "n_shared": 1, "n_act": 3, "coeff": 0.02},
    {"attn": "mla", "n_head": 2, "q_latent_dim": 16, "kv_latent_dim": 8, "rope_head_dim": 4,
     "moe": True, "up_dim": 16, "non_linearity": "relu", "n_exp": 4, "n_shared": 0,
     "n_act": 2, "aux_free": True, "alpha": 0.01, "gamma": 0.05},
    {"attn": "mqa", "n_head": 8, "moe": False, "up_dim": 40, "non_linearity": "geglu"},
]


def tiny_config(**overrides: Any) -> LLMConfig:
    """A validated tiny LLMConfig; keyword arguments are config flags."""
    flags = {**TINY, **overrides}
    return load_config(overrides=flags, check_batch_split=False).model


@pytest.fixture
def make_config():
    """Factory: make_config(**flags) -> a tiny validated LLMConfig."""
    return tiny_config


@pytest.fixture
def mixed_layers() -> list[dict[str, Any]]:
    return [dict(layer) for layer in MIXED_LAYERS]


@pytest.fixture
def moe_flags() -> dict[str, Any]:
    return dict(MOE)


@pytest.fixture
def aux_free_flags() -> dict[str, Any]:
    return dict(AUX_FREE)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
