"""What `sample` and `eval` share: device choice, autocast, a checkpoint's model + tokenizer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.errors import LlmctlError

if TYPE_CHECKING:
    import torch

    from ..runtime.checkpoint import CheckpointInfo
    from ..runtime.device import Precision

@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module  # in eval mode, on precision.device
    info: CheckpointInfo
    tokenizer: Any  # llmctl.data.tokenizers Tokenizer
    precision: Precision

    @property
    def device(self) -> torch.device:
        return self.precision.device

    @property
    def block_size(self) -> int:
        return self.info.run.model.block_size


def load_checkpoint(path: str | os.PathLike, device: str = "auto",
                    dtype: str = "auto") -> LoadedCheckpoint:
    """Model (eval mode) and tokenizer of a checkpoint or run folder, refusing mismatches."""
    from ..data.tokenizers import tokenizer_from_spec
    from ..runtime.checkpoint import CheckpointError, load_model, read_checkpoint
    from ..runtime.device import precision_for

    precision = precision_for(device, dtype)
    info = read_checkpoint(path)
    if not info.tokenizer:
        raise CheckpointError(
            f"{info.path / 'config.json'} records no tokenizer, so its token ids cannot be "
            "turned into text; re-save the checkpoint with a tokenizer spec (llmctl train "
            "records the dataset's)")
    tokenizer = tokenizer_from_spec(info.tokenizer, info.path)
    vocab = info.run.model.vocab_size
    if tokenizer.vocab_size > vocab:
        raise CheckpointError(f"the checkpoint's tokenizer has {tokenizer.vocab_size} tokens but "
                              f"the model only {vocab} (vocab_size); they do not belong together")
    if info.raw.get("adapter"):
        # a LoRA checkpoint: its base (hash-checked) + the adapter, merged in memory
        from ..runtime.base_weights import build_adapted

        model, _ = build_adapted(info.path, info)
        model.to(precision.device)
        model.eval()
    else:
        model, info = load_model(info.path, device=str(precision.device))
    return LoadedCheckpoint(model=model, info=info, tokenizer=tokenizer, precision=precision)


def checkpoint_argument(positional: str | os.PathLike | None,
                        model_path: str | os.PathLike | None) -> str:
    """CKPT or --model_path (the reference's name): exactly one of them."""
    if positional is not None and model_path is not None and str(positional) != str(model_path):
        raise LlmctlError(f"give the checkpoint once: CKPT ({positional}) or --model_path "
                          f"({model_path}), not both")
    path = positional if positional is not None else model_path
    if path is None:
        raise LlmctlError("missing checkpoint: give a checkpoint or run folder (CKPT or "
                          "--model_path)")
    return str(path)
