"""llmctl eval: loss and perplexity of a checkpoint on a dataset split or a text file."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ._common import (
    checkpoint_argument,
    device_option,
    dtype_option,
    load_for_inference,
    model_path_option,
    user_errors,
)

_DATA = "Data"
_BENCH = "Benchmarks (lm-eval)"


def eval_cmd(
    ckpt: Path | None = checkpoint_argument(),
    model_path: Path | None = model_path_option(),
    dataset: str | None = typer.Option(
        None, "--dataset", show_default=False, rich_help_panel=_DATA,
        help="Prepared dataset name (default: the one the checkpoint was trained on)."),
    data_dir: str | None = typer.Option(
        None, "--data_dir", show_default=False, rich_help_panel=_DATA,
        help="Folder holding prepared datasets (default: the checkpoint's)."),
    split: str = typer.Option("val", "--split", rich_help_panel=_DATA,
                              help="Split to evaluate: val or train."),
    text_file: Path | None = typer.Option(
        None, "--text", "--text_file", show_default=False, rich_help_panel=_DATA,
        help="Evaluate this UTF-8 text file (whole, tokenized with the checkpoint's tokenizer) "
        "instead of a dataset split."),
    full: bool = typer.Option(
        False, "--full", help="Whole split, deterministically, in non-overlapping block_size "
        "windows (default: --eval_iters random batches, as the trainer estimates)."),
    eval_iters: int | None = typer.Option(
        None, "--eval_iters", min=1, show_default=False,
        help="Random batches to average (default: the checkpoint's eval_iters)."),
    batch_size: int | None = typer.Option(
        None, "--batch_size", min=1, show_default=False,
        help="Sequences per forward pass (default: the checkpoint's batch_size)."),
    seed: int | None = typer.Option(
        None, "--seed", show_default=False,
        help="Seed of the random batches (default: the trainer's eval seed, the "
        "checkpoint's seed + 1 for train, + 2 for val)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    tasks: str | None = typer.Option(
        None, "--tasks", show_default=False, rich_help_panel=_BENCH,
        help="Comma-separated lm-evaluation-harness tasks (hellaswag,lambada_openai,...) "
        "instead of loss / perplexity; needs the .[eval] extra."),
    num_fewshot: int | None = typer.Option(
        None, "--num_fewshot", min=0, show_default=False, rich_help_panel=_BENCH,
        help="Few-shot examples per task (default: the task's)."),
    limit: float | None = typer.Option(
        None, "--limit", min=0, show_default=False, rich_help_panel=_BENCH,
        help="Documents per task (a fraction when < 1)."),
    include_path: Path | None = typer.Option(
        None, "--include_path", show_default=False, rich_help_panel=_BENCH,
        help="Folder of extra lm-eval task YAMLs (local-file tasks work offline)."),
) -> None:
    """Mean loss (nats/token) and perplexity of a checkpoint, batched, without gradients;
    with --tasks, lm-eval benchmarks."""
    if tasks is not None:
        _benchmarks(ckpt, model_path, tasks, num_fewshot, limit, include_path, batch_size,
                    as_json, device, dtype)
        return
    from ..infer.evaluate import EvalRequest, evaluate_checkpoint
    from ..infer.load import checkpoint_argument

    with user_errors():
        path = checkpoint_argument(ckpt, model_path)
        request = EvalRequest(dataset=dataset, data_dir=data_dir, split=split,
                              text_file=str(text_file) if text_file is not None else None,
                              full=full, eval_iters=eval_iters, batch_size=batch_size, seed=seed)
        request.check()
        loaded = load_for_inference(path, device=device, dtype=dtype)
        report = evaluate_checkpoint(loaded, request)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
        return
    _print_table(report)


def _benchmarks(ckpt, model_path, tasks, num_fewshot, limit, include_path, batch_size,
                as_json, device, dtype) -> None:
    from ..infer.load import checkpoint_argument
    from ..interop import require

    with user_errors():
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        if not names:
            from ..core.errors import LlmctlError

            raise LlmctlError("--tasks needs at least one task name")
        require("lm_eval")
        from ..interop.lm_eval import run_tasks

        path = checkpoint_argument(ckpt, model_path)
        loaded = load_for_inference(path, device=device, dtype=dtype)
        result = run_tasks(loaded, names, num_fewshot=num_fewshot, limit=limit,
                           include_path=str(include_path) if include_path else None,
                           batch_size=batch_size or 8)
    if as_json:
        typer.echo(json.dumps({"checkpoint": path, **result.to_dict()}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lm-eval of {path}", title_justify="left")
    for column in ("task", "metric", "value", "stderr"):
        table.add_column(column)
    for task, metric, value, err in result.rows():
        table.add_row(task, metric, f"{value:.4f}", "" if err is None else f"{err:.4f}")
    Console().print(table)


def _print_table(report) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"eval of {report.checkpoint} (step {report.step})",
                  title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    rows = {"data": report.source, "method": report.method,
            "tokens evaluated": f"{report.tokens:,}", "loss": f"{report.loss:.4f}",
            "perplexity": f"{report.perplexity:.3f}", "time": f"{report.seconds:.2f} s"}
    for key, value in rows.items():
        table.add_row(key, value)
    Console().print(table)
