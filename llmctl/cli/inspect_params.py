"""llmctl inspect-params: parameters, FLOPs, KV cache and memory of a config or checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from ..config.summary import consecutive_groups
from ..core.units import human_bytes, human_count
from ._common import user_errors
from .options import with_config_options


def _source(path: Path) -> Any:
    """A config file as it is; a checkpoint (or run) folder by the config it holds."""
    if path.is_dir():
        from ..runtime.checkpoint import read_checkpoint

        return read_checkpoint(path).raw["config"]
    return path


@with_config_options
def inspect_params(
    files: list[Path] | None = typer.Argument(
        None, help="Config files (YAML, JSON, JSONL), or a checkpoint or run folder (its best, "
        "else latest checkpoint), lowest precedence first."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    config_files: list[Path] = (),
    overrides: dict[str, Any] = None,
) -> None:
    """Total and active parameters, training FLOPs per token, KV-cache size and memory."""
    from ..config import load_config
    from ..model.costs import inspect_model
    from ..runtime.device import activation_bytes

    with user_errors():
        sources = [_source(p) for p in [*(files or []), *config_files]]
        run = load_config(*sources, overrides=overrides, check_batch_split=False)
        report = inspect_model(run.model, run.train, activation_bytes=activation_bytes(
            run.train.device, run.train.dtype))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_report(report)


def _print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    p, m = report["params"], report["model"]
    console.print(f"[bold]{m['n_layer']} layers[/bold], n_embd={m['n_embd']}, vocab_size="
                  f"{m['vocab_size']}, block_size={m['block_size']}, pos_emb={m['pos_emb']}, "
                  f"norm={m['norm']}")
    summary = Table(title="parameters", title_justify="left", show_header=False)
    summary.add_column("what")
    summary.add_column("count", justify="right")
    for label, key in (("total", "total"), ("active per token", "active_per_token"),
                       ("embedding (tied with the LM head)", "embedding"),
                       ("non-embedding", "non_embedding"),
                       ("active non-embedding", "active_non_embedding")):
        summary.add_row(label, f"{p[key]:,} ({human_count(p[key], 2)})")
    console.print(summary)

    layers = Table(title="per layer", title_justify="left")
    for column in ("layer", "attn", "attention", "ffn", "ffn active", "norms", "total",
                   "KV B/token"):
        layers.add_column(column, justify="right" if column not in ("attn",) else "left")
    for group in consecutive_groups(report["layers"], key=lambda layer: {
            k: v for k, v in layer.items() if k != "index"}):
        row = group.item
        layers.add_row(group.span, row["attn"], human_count(row["attention"], 2),
                       f"{row['ffn_kind']} {human_count(row['ffn'], 2)}",
                       human_count(row["ffn_active"], 2), human_count(row["norms"], 2),
                       human_count(row["total"], 2), str(row["kv_cache_bytes_per_token"]))
    console.print(layers)

    mtp = report.get("mtp") or {}
    if mtp.get("depth"):
        console.print(f"multi-token prediction: {mtp['depth']} modules (weight "
                      f"{mtp['weight']}), {mtp['params']:,} parameters "
                      f"({human_count(mtp['params'], 2)}), one block + projection each")
    kv, flops = report["kv_cache"], report["flops"]
    console.print(f"training FLOPs per token: {human_count(flops['training_per_token'], 2)} "
                  f"= {flops['formula']}")
    console.print(f"KV cache ({kv['bytes_per_number']} bytes/number): "
                  f"{human_bytes(kv['bytes_per_token'])} per token, "
                  f"{human_bytes(kv['bytes_full_context'])} for a full {kv['context']}-token "
                  "context")
    mem = report.get("memory")
    if mem:
        precision = ("fp32" if mem["activation_bytes_per_number"] == 4
                     else "16-bit autocast")
        table = Table(title=f"training memory (batch_size {mem['batch_size']} × block_size "
                      f"{mem['block_size']}, {precision} activations)", title_justify="left",
                      show_header=False)
        table.add_column("what")
        table.add_column("bytes", justify="right")
        for label, key in (("weights (fp32)", "weights"), ("gradients (fp32)", "grads"),
                           ("AdamW states", "adamw_states"), ("activations", "activations"),
                           ("activations with act_recomp", "activations_act_recomp"),
                           ("total", "total"), ("total with act_recomp", "total_act_recomp")):
            table.add_row(label, human_bytes(mem[key]))
        console.print(table)
