"""Resuming a run, in one place: which checkpoint `--resume` names, which config the resumed
run uses, and whether the checkpoint's architecture matches it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..config import BlockConfig, LLMConfig, load_config
from ..core.errors import LlmctlError
from ..runtime.checkpoint import (
    CONFIG,
    CheckpointError,
    CheckpointInfo,
    has_checkpoint,
    read_checkpoint,
    resolve_checkpoint,
)
from .run_folder import LATEST, run_dir


def resolve_run_config(config_files: list[Path], overrides: dict[str, Any],
                    world_size: int | None = None) -> Any:
    """The run's config. `--resume CKPT` without a config file continues with the
    checkpoint's own config; flags given now override it (the trainer refuses changes to the
    architecture with the list of differences)."""
    if overrides.get("resume") and not config_files:
        probe = load_config(overrides=overrides, check_batch_split=False)
        ckpt = resume_target(probe.train.resume, run_dir(probe))
        if ckpt is not None:
            info = read_resume_checkpoint(ckpt)
            return load_config(info.raw["config"], overrides=overrides, world_size=world_size)
    return load_config(*config_files, overrides=overrides, world_size=world_size)


def resume_target(resume: str | None, folder: Path) -> Path | None:
    """The checkpoint folder `--resume` names, or None to start fresh.

    'auto' means the run folder's latest checkpoint, and a fresh start when there is none
    yet (so the same command line can be rerun after a crash). A run folder means its
    latest. Anything else must be a checkpoint.
    """
    if not resume:
        return None
    if resume == "auto":
        return resolve_checkpoint(folder / LATEST) if has_checkpoint(folder / LATEST) else None
    path = Path(resume).expanduser()
    if path.is_dir() and not (path / CONFIG).is_file() and has_checkpoint(path / LATEST):
        path = path / LATEST
    try:
        return resolve_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"--resume {resume}: {err}") from None


def read_resume_checkpoint(path: Path) -> CheckpointInfo:
    try:
        return read_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"cannot resume from {path}: {err}") from None


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


def check_same_architecture(info: CheckpointInfo, current: LLMConfig) -> None:
    diffs = architecture_differences(info.run.model, current)
    if diffs:
        shown = "\n  ".join(diffs[:12]) + (f"\n  ... {len(diffs) - 12} more"
                                            if len(diffs) > 12 else "")
        raise LlmctlError(f"cannot resume from {info.path}: it holds a different model "
                          f"architecture:\n  {shown}\nresume with the checkpoint's model "
                          "settings (or start a new run with another --file_name)")
