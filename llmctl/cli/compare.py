"""llmctl compare: the loss curves of several runs in one figure, and a table of them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from ._common import user_errors


def compare(
    paths: list[Path] = typer.Argument(
        ..., metavar="RUN_DIR...", show_default=False,
        help="Run folders, or folders of run folders (a sweep's folder, runs/)."),
    x: str = typer.Option("tokens", "--x", help="x axis: step, tokens, time or flops."),
    output: Path | None = typer.Option(
        None, "--output", "-o", show_default=False,
        help="The PNG to write (default: comparison.png in the one folder of runs given, "
        "else in the current folder)."),
    markdown: Path | None = typer.Option(None, "--markdown", show_default=False,
                                         help="Also write the table as Markdown to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print the table (and the figure's "
                                 "path, and skipped folders) as JSON instead of a table."),
    log: str = typer.Option("auto", "--log", help="Log axes: auto (where the data spans "
                            "enough to need it), x, y, xy or none."),
    title: str = typer.Option("", "--title", help="Figure title."),
) -> None:
    """Compare runs: validation and training loss of every run in one PNG (the legend names
    what differs between them), and a table of parameters, tokens, losses and speed.

    Runs still in progress are read as far as they go; folders without metrics are listed
    and skipped.
    """
    from ..core.files import output_target
    from ..experiments.compare import compare_runs, dumps, write_reports

    with user_errors():
        figure = output or _default_figure(paths)
        for path in (figure, markdown):  # a refused output before any is written
            if path is not None:
                output_target(path)
        result = compare_runs(paths, figure, x=x, log=log, title=title)
        write_reports(result, markdown=markdown)
    if as_json:
        typer.echo(dumps(result))
        return
    show_comparison(result)
    if markdown:
        typer.echo(f"table: {markdown}")


def _default_figure(paths: list[Path]) -> Path:
    from ..experiments.compare import find_runs

    if len(paths) == 1:
        runs, _ = find_runs(paths)
        if paths[0].is_dir() and paths[0] not in runs:
            return paths[0] / "comparison.png"  # a folder of runs (a sweep's)
    return Path("comparison.png")


def show_comparison(result: Any) -> None:
    """The rich table, then skipped folders and notes; the figure's path last."""
    from rich.console import Console
    from rich.table import Table

    from ..experiments.compare import COLUMNS, format_row

    # a pipe or a file gets the whole table, not one folded to 80 columns
    console = Console(width=None if sys.stdout.isatty() else 220)
    table = Table(title="runs", title_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "run" else "right",
                         overflow="fold")
    for row in result.rows:
        cells = format_row(row)
        table.add_row(*(cells[c] for c in COLUMNS))
    console.print(table)
    for row in result.rows:
        for note in row["notes"]:
            typer.echo(f"note: {row['run']}: {note}")
    for folder, why in result.skipped:
        typer.echo(f"skipped {folder}: {why}")
    if result.figure:
        typer.echo(f"figure: {result.figure}")
