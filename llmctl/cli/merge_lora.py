"""llmctl merge-lora: fold a LoRA checkpoint's adapter into its base -> a plain checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import user_errors


def merge_lora(
    ckpt: Path = typer.Argument(..., metavar="CKPT", help="LoRA checkpoint (or its run folder)."),
    out: Path = typer.Argument(..., metavar="OUT", help="Folder for the merged checkpoint."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace OUT if it exists."),
) -> None:
    """Write base + adapter as one plain checkpoint (sample / eval / train --init_from it)."""
    with user_errors():
        from ..runtime.merge import merge_checkpoint

        path = merge_checkpoint(ckpt, out, force=force)
    typer.echo(f"merged checkpoint: {path}")
