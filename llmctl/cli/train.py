"""llmctl train: train a model from config files and flags (one process, or many via torchrun)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from ..core.errors import LlmctlError
from ._common import with_hf_init
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
    # a worker started by `--nproc` (its launcher sets the variable; torch is not imported
    # here, so the name is spelled out rather than imported from train.launch)
    launched_worker = bool(os.environ.get("LLMCTL_LAUNCHER_PID") and os.environ.get("WORLD_SIZE"))
    try:
        if launched_worker:
            from ..train.launch import die_with_parent

            die_with_parent()  # never outlive the launcher
        if not launched_worker:  # the --nproc workers get the imported path
            # every rank of a hand-started torchrun: the first imports, the others wait
            overrides = with_hf_init(config_files, overrides)
        if nproc and nproc > 1:
            from ..train.launch import launch_training

            raise typer.Exit(launch_training(nproc, config_files, overrides))
        from ..train.resume import resolve_run_config

        run = resolve_run_config(config_files, overrides)
        from ..train.trainer import train as run_training

        result = run_training(run)
    except LlmctlError as err:
        reported = False
        if launched_worker:  # the launcher prints a worker's error once, for all ranks
            from ..train.launch import report_worker_error

            reported = report_worker_error(int(rank) if rank.isdigit() else 0, err)
        if not reported:
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
    # the reference's default saves nothing: say so where the user would look for the weights
    saved = "" if run.train.save_model else " (no checkpoint saved: train with --save_model)"
    typer.echo(", ".join(parts) + f"; run folder {result.run_dir}{saved}")
