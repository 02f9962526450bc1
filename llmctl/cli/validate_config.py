"""llmctl validate-config: check config files and flags without training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from ._common import user_errors, with_hf_init
from .options import with_config_options


@with_config_options
def validate_config(
    files: list[Path] | None = typer.Argument(
        None, help="Config files (YAML, JSON object or array, JSONL), lowest precedence first."),
    as_json: bool = typer.Option(False, "--json", help="Print the resolved config as JSON "
                                 "(readable back with --config)."),
    world_size: int | None = typer.Option(None, "--world_size", min=1,
                                             help="Data-parallel ranks to check the batch "
                                             "split for (default: $WORLD_SIZE or 1)."),
    config_files: list[Path] = (),
    overrides: dict[str, Any] = None,
) -> None:
    """Check configs and flags; print the resolved model and training setup."""
    from ..config import load_config

    with user_errors():
        sources = [*(files or []), *config_files]
        probe = load_config(*sources, overrides=overrides, check_batch_split=False)
        if probe.train.init_from and not probe.train.resume:
            # the architecture comes from the checkpoint: resolve it as train does (an
            # hf:PATH is imported into a temporary folder: validation writes nothing)
            import tempfile

            from ..train.resume import resolve_run_config

            with tempfile.TemporaryDirectory() as scratch:
                flags = with_hf_init(sources, dict(overrides or {}), Path(scratch))
                run = resolve_run_config(sources, flags, world_size)
        else:
            run = load_config(*sources, overrides=overrides, world_size=world_size)
    if as_json:
        typer.echo(json.dumps(run.to_dict(), indent=2))
        return
    _print_summary(run, world_size or 1)


def _print_summary(run: Any, world_size: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..config.summary import attention_label, ffn_label, layer_groups, training_summary

    m = run.model
    console = Console()
    console.print(f"[green]config OK[/green]  {m.n_layer} layers, n_embd={m.n_embd}, "
                  f"vocab_size={m.vocab_size}, block_size={m.block_size}, pos_emb={m.pos_emb}, "
                  f"norm={m.norm}, dropout={m.dropout}")
    table = Table(title="layers", title_justify="left")
    for column in ("layer", "attn", "heads", "kv", "ffn"):
        table.add_column(column)
    for group in layer_groups(run):
        heads, kv = attention_label(group.block)
        table.add_row(group.span, group.block.attn, heads, kv, ffn_label(group.block))
    console.print(table)
    train = Table(title="training", title_justify="left", show_header=False)
    train.add_column("setting")
    train.add_column("value")
    for key, value in training_summary(run, world_size).items():
        train.add_row(key, str(value))
    console.print(train)
