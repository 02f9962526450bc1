"""llmctl export: a checkpoint as a Hugging Face transformers folder."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ._common import checkpoint_argument, user_errors


def export(
    ckpt: Path = checkpoint_argument(),
    out: Path = typer.Argument(..., metavar="OUT", show_default=False,
                               help="Folder to write (config.json, model.safetensors, "
                               "generation_config.json, tokenizer files)."),
    fmt: str = typer.Option(
        "auto", "--format", help="native (a transformers class, refused when the model is not "
        "exactly one), remote (model type llmctl, trust_remote_code=True) or auto (native "
        "when exact, else remote)."),
    dtype: str | None = typer.Option(
        None, "--dtype", show_default=False,
        help="Store the weights as float32, bfloat16 or float16 (default: as checkpointed)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is not empty."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Write a transformers folder that AutoModelForCausalLM / AutoTokenizer load."""
    from ..interop.hf_export import export_checkpoint

    with user_errors():
        if ckpt is None:
            from ..core.errors import LlmctlError

            raise LlmctlError("missing checkpoint: give CKPT and OUT")
        report = export_checkpoint(ckpt, out, fmt=fmt, dtype=dtype, force=force)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
        return
    remote = report.family == "llmctl"
    typer.echo(f"exported {ckpt} to {report.path} as {report.architecture}"
               + (" (load with trust_remote_code=True)" if remote else ""))
    if report.dropped_rows:
        typer.echo(f"vocabulary cut to the tokenizer's {report.vocab_size} tokens "
                   f"({report.dropped_rows} padding rows dropped)")
    if remote and fmt == "auto":
        for family, why in report.not_native.items():
            typer.echo(f"  not {family}: {'; '.join(why)}")
