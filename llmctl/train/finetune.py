"""The trainer's fine-tuning side: load the weights a run starts from (init_from, or the base
of a LoRA run being resumed), attach LoRA, and what its checkpoints record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..config import TrainConfig
from ..core.errors import LlmctlError
from ..data.loader import PreparedDataset
from ..runtime import lora
from ..runtime.base_weights import adapter_base, load_base, resolve_base_path
from ..runtime.checkpoint import CheckpointInfo, read_checkpoint
from .init import new_token_rows, read_init_source


@dataclass
class StartWeights:
    init: dict[str, Any] | None  # {"path", "sha256", "step"} of the source checkpoint
    tuner: Any  # peft's LoraModel when LoRA is on
    new_rows: tuple[int, int] | None  # embedding rows of tokens new to the source

    def config_record(self) -> dict[str, Any]:
        """config.json keys: where the run started, and for LoRA the adapter's base."""
        if not self.init:
            return {}
        out: dict[str, Any] = {"init_from": self.init}
        if self.tuner is not None:
            out["adapter"] = {"base": self.init, "config": lora.ADAPTER_CONFIG,
                              "weights": lora.ADAPTER_WEIGHTS}
        return out

    def adapter_files(self, model: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
        """save_checkpoint's tensor_files / json_files for a LoRA run ({} otherwise)."""
        if self.tuner is None:
            return {}
        config = lora.adapter_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                                     cfg.lora_groups, self.init, self.new_rows)
        return {"tensor_files": {lora.ADAPTER_WEIGHTS: lora.adapter_tensors(model,
                                                                            self.new_rows)},
                "json_files": {lora.ADAPTER_CONFIG: config}}

    def trainable_params(self, model: nn.Module) -> int:
        n = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
        if self.new_rows:
            n += (self.new_rows[1] - self.new_rows[0]) * model.wte.weight.shape[1]
        return n


def load_start_weights(model: nn.Module, cfg: TrainConfig, dataset: PreparedDataset,
                       ckpt: Path | None, info: CheckpointInfo | None) -> StartWeights:
    """Weights of a fresh init_from run, or of a LoRA run resumed from `ckpt` (its base,
    hash-checked, then its adapter)."""
    if ckpt is not None:
        base = adapter_base(info.raw, ckpt)
        if base is None:
            raise LlmctlError(f"cannot resume a LoRA run from {ckpt}: it holds full weights, "
                              "not an adapter (resume without --lora_rank)")
        base_path, expected = resolve_base_path(base, ckpt), base["sha256"]
        base_info = read_checkpoint(base_path)
    else:
        source = read_init_source(cfg.init_from)
        base_path, base_info, expected = source.path, source.info, None
    new_rows = new_token_rows(base_info.tokenizer, dataset, str(base_path))
    sha = load_base(model, base_path, new_rows, expected_sha=expected)
    record = {"path": str(Path(base_path).resolve()), "sha256": sha, "step": base_info.step}
    if not cfg.lora:
        return StartWeights(record, None, new_rows)
    tuner = lora.attach(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_groups)
    if new_rows:
        _train_rows_only(model.wte.weight, *new_rows)
    if ckpt is not None:
        config, tensors = lora.read_adapter(ckpt)
        lora.load_adapter_tensors(model, tensors, new_rows, f"adapter of {ckpt}")
    return StartWeights(record, tuner, new_rows)


def _train_rows_only(weight: nn.Parameter, lo: int, hi: int) -> None:
    """Let rows [lo, hi) of the embedding train (the new special tokens, which the base never
    saw) while every other row keeps its base value bitwise: their gradient is zeroed and
    they get no weight decay, so AdamW's update for them is exactly 0."""
    import torch

    keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    keep[lo:hi] = 1
    weight.requires_grad = True
    weight.no_weight_decay = True
    weight.register_hook(lambda grad: grad * keep.to(grad.device, grad.dtype))
