"""Resuming a run, in one place: which checkpoint `--resume` names, which config the resumed
run uses, whether the checkpoint's architecture matches it, and its training state read and
checked against the model and optimizer it is loaded into."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import LLMConfig, load_config
from ..core.errors import LlmctlError
from ..runtime.checkpoint import (
    CONFIG,
    OPTIMIZER,
    CheckpointError,
    CheckpointInfo,
    has_checkpoint,
    load_training_state,
    read_checkpoint,
    resolve_checkpoint,
)
from ..runtime.checkpoint_data import check_optimizer_state
from .architecture import architecture_differences
from .run_folder import LATEST, run_dir

if TYPE_CHECKING:
    import torch


def resolve_run_config(config_files: list[Path], overrides: dict[str, Any],
                    world_size: int | None = None) -> Any:
    """The run's config. `--resume CKPT` without a config file continues with the
    checkpoint's own config; flags given now override it (the trainer refuses changes to the
    architecture with the list of differences)."""
    if overrides.get("resume") and overrides.get("init_from"):
        raise LlmctlError("--resume continues a run, --init_from starts a new one from "
                          "weights: give one of them")
    if overrides.get("resume") and not config_files:
        probe = load_config(overrides=overrides, check_batch_split=False)
        ckpt = resume_target(probe.train.resume, run_dir(probe))
        if ckpt is not None:
            info = read_resume_checkpoint(ckpt)
            return load_config(info.raw["config"], overrides=overrides, world_size=world_size)
    probe = load_config(*config_files, overrides=overrides, check_batch_split=False)
    if probe.train.init_from and not (probe.train.resume and resume_target(
            probe.train.resume, run_dir(probe))):
        # a fresh start from weights (a config file naming init_from, rerun with
        # --resume auto after a crash, resumes instead)
        from .init import init_run_config, read_init_source

        source = read_init_source(probe.train.init_from)
        return init_run_config(config_files, overrides, world_size, source)
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


def check_same_architecture(info: CheckpointInfo, current: LLMConfig) -> None:
    diffs = architecture_differences(info.run.model, current)
    if diffs:
        shown = "\n  ".join(diffs[:12]) + (f"\n  ... {len(diffs) - 12} more"
                                            if len(diffs) > 12 else "")
        raise LlmctlError(f"cannot resume from {info.path}: it holds a different model "
                          f"architecture:\n  {shown}\nresume with the checkpoint's model "
                          "settings (or start a new run with another --file_name)")


def read_training_state(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(optimizer state, trainer state) of `ckpt`, both checked as data; the optimizer
    state against `optimizer` over `model`, before any load_state_dict (which trusts shapes:
    a state tensor of the wrong shape can crash the process)."""
    opt_state, state = load_training_state(ckpt)  # trainer_state.json validated there
    if opt_state is None or not state:
        raise LlmctlError(f"cannot resume from {ckpt}: it has no optimizer / trainer "
                          "state (only weights); start a new run from its weights "
                          f"with --init_from {ckpt}")
    check_optimizer_state(opt_state, model, optimizer, ckpt / OPTIMIZER)
    return opt_state, state
