"""Weights a new run starts from: a base checkpoint, its hash, a vocabulary grown for new
special tokens, and (for adapter checkpoints) base + adapter rebuilt as one model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.bounds import SHA256_HEX
from ..core.errors import LlmctlError, preview
from .checkpoint import WEIGHTS, CheckpointError, read_checkpoint, read_weights
from .lora import sha256_of

if TYPE_CHECKING:
    import torch
    from torch import nn

EMBEDDING = "wte.weight"
HEAD = "lm_head.weight"
_MAX_PATH = 4096  # PATH_MAX


def weights_sha256(folder: Path) -> str:
    """sha256 of a checkpoint's weights file: the identity of a base model."""
    file = Path(folder) / WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    return sha256_of(file)


def grow_vocab(tensors: dict[str, torch.Tensor], vocab_size: int,
               new_rows: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    """The state dict with the embedding (and tied head) grown to `vocab_size` rows.

    Rows of new tokens [lo, hi) and rows past the old end start from the mean of the
    embedding rows of the old tokenizer's ids [0, lo); every other row is kept bitwise.
    """
    import torch

    old = tensors[EMBEDDING]
    if old.shape[0] > vocab_size:
        raise LlmctlError(f"cannot shrink the vocabulary from {old.shape[0]} to {vocab_size}")
    if old.shape[0] == vocab_size and new_rows is None:
        return tensors
    lo = new_rows[0] if new_rows else old.shape[0]
    mean = old[:lo].mean(dim=0, keepdim=True)  # (1, C)
    grown = torch.cat([old, mean.expand(vocab_size - old.shape[0], -1)])  # (V, C)
    if new_rows:
        grown[new_rows[0]:new_rows[1]] = mean
    out = dict(tensors)
    out[EMBEDDING] = grown
    if HEAD in out:
        out[HEAD] = grown  # tied
    return out


def load_base(model: nn.Module, folder: Path, new_rows: tuple[int, int] | None,
              expected_sha: str | None = None) -> str:
    """Load a base checkpoint's weights into `model` (vocabulary grown to the model's);
    refuses a base whose hash is not `expected_sha`. Returns the base's hash."""
    sha = weights_sha256(folder)
    if expected_sha is not None and sha != expected_sha:
        raise CheckpointError(f"the base checkpoint {folder} has changed: its weights hash "
                              f"{sha[:12]}..., the adapter was trained on {expected_sha[:12]}...; "
                              "use the original base (or retrain the adapter)")
    tensors = grow_vocab(read_weights(folder), model.config.vocab_size, new_rows)
    expected = model.state_dict()
    problems = [n for n in expected if n not in tensors]
    problems += [f"{n}: base {tuple(tensors[n].shape)}, model {tuple(t.shape)}"
                 for n, t in expected.items() if n in tensors and tensors[n].shape != t.shape]
    if problems:
        raise CheckpointError(f"weights in {folder / WEIGHTS} do not fit the model:\n  "
                              + "\n  ".join(problems[:10]))
    model.load_state_dict({n: tensors[n] for n in expected}, strict=True)
    return sha


def adapter_base(raw: dict[str, Any], folder: Path) -> dict[str, Any] | None:
    """The base record of an adapter checkpoint's config.json (None: a plain checkpoint)."""
    adapter = raw.get("adapter")
    if adapter is None:
        return None
    base = adapter.get("base") if isinstance(adapter, dict) else None
    if not isinstance(base, dict) or not base.get("path") or not base.get("sha256"):
        raise CheckpointError(f"{folder}/config.json has an adapter record without its base "
                              "path and sha256")
    path, sha = base["path"], base["sha256"]
    if not isinstance(path, str) or len(path) > _MAX_PATH or "\0" in path:
        raise CheckpointError(f"{folder}/config.json: adapter.base.path must be a folder path "
                              f"(a string of at most {_MAX_PATH} characters), got {preview(path)}")
    if not isinstance(sha, str) or not SHA256_HEX.fullmatch(sha):
        raise CheckpointError(f"{folder}/config.json: adapter.base.sha256 must be 64 hex "
                              f"digits, got {preview(sha)}")
    return base


def resolve_base_path(base: dict[str, Any], folder: Path) -> Path:
    """The base checkpoint folder: as recorded, else relative to the adapter checkpoint."""
    path = Path(base["path"])
    try:
        if not path.is_absolute() and not path.exists():
            path = folder / path
        path.exists()  # a name the system cannot take (too long) fails here, not later
    except OSError as err:
        raise CheckpointError(f"{folder}/config.json: adapter.base.path cannot be a folder "
                              f"here ({err.strerror or err})") from None
    return path


def build_adapted(folder: Path, info: Any, *, merge: bool = True) -> tuple[nn.Module, Any]:
    """(model, tuner) of an adapter checkpoint: its base (hash checked), vocabulary grown as in
    training, adapters loaded; merged into plain weights when `merge` (inference)."""
    from ..model import LLM
    from .lora import attach, read_adapter
    from .lora import merge as merge_adapters

    base = adapter_base(info.raw, folder)
    config, tensors = read_adapter(folder)
    new_rows = tuple(config["added_token_rows"]) if config.get("added_token_rows") else None
    model = LLM(info.run.model)
    base_path = resolve_base_path(base, folder)
    try:
        read_checkpoint(base_path)
    except CheckpointError as err:
        raise CheckpointError(f"the base of adapter {folder} is unavailable: {err}") from None
    load_base(model, base_path, new_rows, expected_sha=base["sha256"])
    tuner = attach(model, int(config["r"]), float(config["lora_alpha"]), 0.0,
                   list(config["targets"]))
    from .lora import load_adapter_tensors

    load_adapter_tensors(model, tensors, new_rows, f"adapter {folder}")
    if merge:
        model = merge_adapters(tuner, model)
        tuner = None
    return model, tuner
