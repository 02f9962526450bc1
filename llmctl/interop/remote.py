"""The remote-code family: any llmctl model as transformers model type `llmctl`, loaded with
trust_remote_code=True through the shipped `modeling_llmctl.py` (which builds the installed
llmctl's own model, so nothing is re-implemented and every checkpoint can be exported)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..config.loader import load_config
from ..config.schema import LLMConfig
from ..core.errors import ConfigError
from .adapter import Adapter, ImportRefused, StateDict

MODELING_FILE = Path(__file__).with_name("modeling_llmctl.py")
PREFIX = "model."


def problems(config: LLMConfig) -> list[str]:
    return []  # every llmctl model fits


def to_hf_config(config: LLMConfig, vocab: int) -> dict[str, Any]:
    model = dataclasses.asdict(dataclasses.replace(config, vocab_size=vocab))
    layers = model.pop("layers")
    model["dropout"] = 0.0
    stem = MODELING_FILE.stem
    return {"model_type": "llmctl", "architectures": ["LlmctlForCausalLM"],
            "auto_map": {"AutoConfig": f"{stem}.LlmctlConfig",
                         "AutoModelForCausalLM": f"{stem}.LlmctlForCausalLM"},
            "llmctl_model": model, "llmctl_layers": layers, "vocab_size": vocab,
            "max_position_embeddings": config.block_size, "hidden_size": config.n_embd,
            "num_hidden_layers": config.n_layer, "tie_word_embeddings": True,
            "use_cache": True}


def to_hf(sd: StateDict, config: LLMConfig) -> StateDict:
    return {PREFIX + k: v for k, v in sd.items() if k != "lm_head.weight"}


def from_hf_config(hf: dict[str, Any]) -> LLMConfig:
    try:
        run = load_config({"model": dict(hf["llmctl_model"]),
                           "layers": list(hf["llmctl_layers"])}, check_batch_split=False)
    except (KeyError, TypeError) as err:
        raise ImportRefused(f"an llmctl model type without its llmctl config ({err})") from None
    except ConfigError as err:
        raise ImportRefused(f"the folder's llmctl config is invalid:\n{err}") from None
    return run.model


def from_hf(sd: StateDict, config: LLMConfig, hf: dict[str, Any]) -> StateDict:
    out = {k.removeprefix(PREFIX): v for k, v in sd.items()}
    out["lm_head.weight"] = out["wte.weight"]
    return out


ADAPTER = Adapter("llmctl", "LlmctlForCausalLM", problems, to_hf_config, to_hf, from_hf_config,
                  from_hf)
