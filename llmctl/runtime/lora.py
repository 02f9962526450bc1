"""LoRA through peft: target groups -> module / parameter names, attach, adapter files, merge.

Groups (`lora_targets`) and what they adapt:
- attention: every projection of every attention kind: `qkv`, `proj` (mha / mqa / gqa);
  `q_down`, `q_up`, `kv_down`, `kv_up`, `proj` (mla);
- mlp: the MLP's `up` / `down`, and the always-on shared experts of MoE layers;
- experts: the routed experts' stacked weights `w_up`, `w_down` (n_exp, in, out), through
  peft's `target_parameters` (one low-rank update per expert);
- router: the MoE router's linear layer;
- lm_head: the output projection (tied to the token embedding: the adapter changes the
  logits only; such an adapter is used by sample / eval / chat but cannot be merged into a
  plain, tied checkpoint).
Not targetable: embeddings, norms. Aux-free MoE routing biases keep being updated (a
buffer, not a gradient) and are saved with the adapter.

An adapter checkpoint holds `adapter.safetensors` (the LoRA tensors, plus the rows of tokens
new to the base, which train with them) and `adapter_config.json`; its config.json records
the base checkpoint and the sha256 of the base's weights file.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config.schema import LORA_GROUPS
from ..core.errors import LlmctlError
from ..core.files import CHECKPOINT_JSON_LIMIT, read_user_file

if TYPE_CHECKING:
    import torch
    from torch import nn

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
NEW_ROWS = "added_token_rows"  # (k, C) embedding rows of tokens the base did not have
_ATTENTION = ("qkv", "proj", "q_down", "q_up", "kv_down", "kv_up")
_MLP = ("up", "down")
_BIASES = "expert_bias"


def require_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise LlmctlError("LoRA needs the optional package peft: pip install -e "
                          "'.[finetune]' (or pip install peft)") from None
    return peft


def target_names(model: nn.Module, groups: list[str]) -> tuple[list[str], list[str]]:
    """(module names, parameter names) the groups name in `model`; refuses empty groups."""
    modules: list[str] = []
    params: list[str] = []
    found = dict.fromkeys(groups, 0)
    for name, _ in model.named_modules():
        parts = name.split(".")
        leaf, parent = parts[-1], parts[-2] if len(parts) > 1 else ""
        group = None
        if len(parts) == 4 and parent == "attn" and leaf in _ATTENTION:
            group = "attention"
        elif (len(parts) == 4 and parent == "ffn" or parent == "shared") and leaf in _MLP:
            group = "mlp"
        elif parent == "ffn" and leaf == "router":
            group = "router"
        elif name == "lm_head":
            group = "lm_head"
        elif parent == "ffn" and leaf == "experts" and "experts" in groups:
            found["experts"] += 1
            params += [f"{name}.w_up", f"{name}.w_down"]
        if group in found:
            found[group] += 1
            modules.append(name)
    empty = [g for g, n in found.items() if n == 0]
    if empty:
        raise LlmctlError(f"lora_targets: {', '.join(empty)} match(es) nothing in this model "
                          "(experts and router need MoE layers)")
    return modules, params


def attach(model: nn.Module, rank: int, alpha: float, dropout: float,
           groups: list[str]) -> Any:
    """Inject LoRA adapters in place (base weights frozen); returns peft's LoraModel."""
    require_peft()
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    modules, params = target_names(model, groups)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=modules or None, target_parameters=params or None,
                        bias="none")
    tuner = LoraModel(model, config, "default")
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
    return tuner


def adapter_tensors(model: nn.Module, new_rows: tuple[int, int] | None) -> dict:
    """The adapter's tensors: LoRA weights, and the embedding rows [lo, hi) of new tokens."""
    out = {name: p.detach() for name, p in model.named_parameters() if "lora_" in name}
    # aux-free MoE routing biases move during training too: they belong to the fine-tune
    out.update({name: b.detach() for name, b in model.named_buffers()
                if name.endswith(_BIASES)})
    if new_rows is not None:
        lo, hi = new_rows
        out[NEW_ROWS] = model.wte.weight.detach()[lo:hi]
    return out


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor],
                         new_rows: tuple[int, int] | None, origin: str) -> None:
    """Copy saved adapter tensors into an attached model; names and shapes must match."""
    import torch

    params = dict(model.named_parameters())
    params.update({n: b for n, b in model.named_buffers() if n.endswith(_BIASES)})
    ours = {n for n in params if "lora_" in n or n.endswith(_BIASES)}
    ours |= {NEW_ROWS} if new_rows else set()
    problems = [f"missing {n}" for n in sorted(ours - tensors.keys())]
    problems += [f"unexpected {n}" for n in sorted(tensors.keys() - ours)]
    for name in sorted(ours & tensors.keys()):
        target = (model.wte.weight[new_rows[0]:new_rows[1]] if name == NEW_ROWS
                  else params[name])
        if tuple(target.shape) != tuple(tensors[name].shape):
            problems.append(f"{name}: saved {tuple(tensors[name].shape)}, model needs "
                            f"{tuple(target.shape)}")
    if problems:
        raise LlmctlError(f"{origin} does not fit this model and LoRA setting:\n  "
                          + "\n  ".join(problems[:10]))
    with torch.no_grad():
        for name in ours:
            if name == NEW_ROWS:
                model.wte.weight[new_rows[0]:new_rows[1]] = tensors[name]
            else:
                params[name].copy_(tensors[name])


def merge(tuner: Any, model: nn.Module) -> nn.Module:
    """The plain model with every adapter folded into its base weight. An adapted lm_head
    is first untied from the embedding, so the embedding keeps its base values."""
    from torch import nn as _nn

    head = model.lm_head
    if hasattr(head, "base_layer"):
        head.base_layer.weight = _nn.Parameter(model.wte.weight.detach().clone())
    merged = tuner.merge_and_unload()
    for param in merged.parameters():
        param.requires_grad = False
    return merged


def has_head_adapter(model: nn.Module) -> bool:
    return hasattr(model.lm_head, "base_layer")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def adapter_config(rank: int, alpha: float, dropout: float, groups: list[str],
                   base: dict[str, Any], new_rows: tuple[int, int] | None) -> dict[str, Any]:
    return {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
            "targets": list(groups), "base": base,
            "added_token_rows": list(new_rows) if new_rows else None}


def read_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors of adapter.safetensors) of an adapter checkpoint."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        config = json.loads(read_user_file(folder / ADAPTER_CONFIG, "adapter config",
                                           CHECKPOINT_JSON_LIMIT))
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except (LlmctlError, OSError, ValueError, SafetensorError) as err:
        raise LlmctlError(f"the adapter in {folder} is missing or unreadable ({err})") from None
    problems = _adapter_config_problems(config)
    if problems:
        raise LlmctlError(f"the adapter config {folder / ADAPTER_CONFIG} is not valid: "
                          + "; ".join(problems))
    return config, tensors


def _adapter_config_problems(config: Any) -> list[str]:
    """What is wrong with an adapter_config.json's fields (checked as data, all at once)."""
    if not isinstance(config, dict):
        return ["not a JSON object"]
    problems = []
    rank = config.get("r")
    if type(rank) is not int or rank < 1:
        problems.append(f"r must be a whole number >= 1, got {rank!r}")
    alpha = config.get("lora_alpha")
    if type(alpha) not in (int, float) or not math.isfinite(alpha):
        problems.append(f"lora_alpha must be a finite number, got {alpha!r}")
    targets = config.get("targets")
    if (not isinstance(targets, list) or not targets
            or not all(isinstance(t, str) and t in LORA_GROUPS for t in targets)):
        problems.append(f"targets must be a list of {', '.join(LORA_GROUPS)}, got {targets!r}")
    rows = config.get("added_token_rows")
    if rows is not None and not (isinstance(rows, list) and len(rows) == 2
                                 and all(type(r) is int for r in rows) and 0 <= rows[0] < rows[1]):
        problems.append(f"added_token_rows must be null or [first, end) with 0 <= first < end, "
                        f"got {rows!r}")
    return problems
