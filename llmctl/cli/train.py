"""llmctl train: train a model from config files and flags (one process, or many via torchrun)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from ..core.errors import LlmctlError
from .options import with_config_options


@with_config_options
def train(
    nproc: int | None = typer.Option(
        None, "--nproc", min=1, rich_help_panel="Distributed",
        help="Launch N data-parallel processes on this machine through torchrun (same as "
        "`torchrun --standalone --nproc_per_node N -m llmctl train ...`)."),
    config_files: list[Path] = (),
    overrides: dict[str, Any] = None,
) -> None:
    """Train a model. Checkpoints and metrics.jsonl go to out_dir/file_name/.

    Multi-node: run `torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d
    --rdzv_endpoint HOST:PORT -m llmctl train ...` on every node.
    """
    overrides = dict(overrides or {})
    rank = os.environ.get("RANK", "0").strip() or "0"  # torchrun sets it per worker
    try:
        if nproc and nproc > 1:
            raise typer.Exit(_launch(nproc, config_files, overrides))
        run = _resolve_config(config_files, overrides)
        from ..train.trainer import train as run_training

        result = run_training(run)
    except LlmctlError as err:
        typer.echo(f"{f'rank {rank}: ' if rank != '0' else ''}error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None
    if rank != "0":
        return
    if result.stopped_by:
        typer.echo(f"stopped by {result.stopped_by} after step {result.step}; latest "
                   f"checkpoint: {result.run_dir / 'latest'} (continue with --resume auto)")
        return
    parts = [f"done: {result.step} steps"]
    if result.last_loss is not None:
        parts.append(f"last loss {result.last_loss:.4f}")
    if result.best_val is not None:
        parts.append(f"best val {result.best_val:.4f}")
    typer.echo(", ".join(parts) + f"; run folder {result.run_dir}")


def _resolve_config(config_files: list[Path], overrides: dict[str, Any],
                    world_size: int | None = None) -> Any:
    """The run's config. `--resume CKPT` without a config file continues with the
    checkpoint's own config; flags given now override it (the trainer refuses changes to the
    architecture with the list of differences)."""
    from ..config import load_config
    from ..train.run_folder import read_resume_checkpoint, resume_target, run_dir

    if overrides.get("resume") and not config_files:
        probe = load_config(overrides=overrides, check_batch_split=False)
        ckpt = resume_target(probe.train.resume, run_dir(probe))
        if ckpt is not None:
            info = read_resume_checkpoint(ckpt)
            return load_config(info.raw["config"], overrides=overrides, world_size=world_size)
    return load_config(*config_files, overrides=overrides, world_size=world_size)


def _launch(nproc: int, config_files: list[Path], overrides: dict[str, Any]) -> int:
    from ..runtime.distributed import launch

    _resolve_config(config_files, overrides, world_size=nproc)  # fail before spawning
    args: list[str] = []
    for path in config_files:
        args += ["--config", str(path)]
    for key, value in overrides.items():
        if isinstance(value, bool):
            args.append(f"--{key}" if value else f"--no-{key}")
        else:
            args += [f"--{key}", str(value)]
    return launch(nproc, args)
