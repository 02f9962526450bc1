"""llmctl sweep: train a grid of configs one after another (restartable), or hand the grid
to a scheduler (--dry-run commands, --slurm job array)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ._common import user_errors
from .options import with_config_options

_PANEL = "SLURM (with --slurm)"


@with_config_options
def sweep(
    sets: list[str] = typer.Option(
        [], "--set", rich_help_panel="Sweep", show_default=False,
        help="KEY=V1,V2,...: one axis of the grid (repeat for more; the grid is their "
        "cartesian product). KEY is any config key, per-layer ones too: layers[2].attn=gqa,mla."),
    name: str | None = typer.Option(
        None, "--name", rich_help_panel="Sweep", show_default=False,
        help="Sweep name: points go to out_dir/NAME/POINT/ (default: the first config "
        "file's name)."),
    dry_run: bool = typer.Option(
        False, "--dry_run", rich_help_panel="Sweep",
        help="Write each point's config and print one `llmctl train` command per point "
        "instead of training."),
    slurm: Path | None = typer.Option(
        None, "--slurm", rich_help_panel="Sweep", show_default=False,
        help="Write a SLURM job-array script (one array index per point) instead of training."),
    x: str = typer.Option("tokens", "--x", rich_help_panel="Sweep",
                          help="x axis of the final comparison figure."),
    nodes: int = typer.Option(1, "--nodes", min=1, rich_help_panel=_PANEL,
                              help="Nodes per point."),
    gpus_per_node: int = typer.Option(
        0, "--gpus_per_node", min=0, rich_help_panel=_PANEL,
        help="GPUs per node; torchrun starts one process per GPU (0: one CPU process)."),
    cpus_per_task: int | None = typer.Option(None, "--cpus_per_task", min=1,
                                             rich_help_panel=_PANEL, show_default=False),
    time: str | None = typer.Option(None, "--time", rich_help_panel=_PANEL, show_default=False,
                                    help="Time limit per point, e.g. 02:00:00."),
    partition: str | None = typer.Option(None, "--partition", rich_help_panel=_PANEL,
                                         show_default=False),
    account: str | None = typer.Option(None, "--account", rich_help_panel=_PANEL,
                                       show_default=False),
    mem: str | None = typer.Option(None, "--mem", rich_help_panel=_PANEL, show_default=False),
    sbatch: list[str] = typer.Option(
        [], "--sbatch", rich_help_panel=_PANEL, show_default=False,
        help="Another #SBATCH option for the script, e.g. --sbatch=--qos=high (repeatable)."),
    config_files: list[Path] = (),
    overrides: dict[str, Any] = None,
) -> None:
    """Train every point of a grid into out_dir/NAME/POINT/ with equal seeds, then compare.

    Every point is validated before any trains. Rerunning the same command skips finished
    points and resumes an interrupted one from its latest checkpoint (--resume auto), so
    points always save checkpoints.
    """
    from ..core.files import output_target
    from ..experiments.sweep import (
        SlurmResources,
        parse_set,
        plan_sweep,
        run_sweep,
        train_command,
        write_point_configs,
        write_slurm_script,
    )

    with user_errors():
        if slurm:  # refused before any point config is written
            output_target(slurm)
        axes = [parse_set(spec) for spec in sets]
        res = SlurmResources(nodes=nodes, gpus_per_node=gpus_per_node,
                             cpus_per_task=cpus_per_task, time=time, partition=partition,
                             account=account, mem=mem, extra=list(sbatch))
        world = res.world_size if slurm else 1
        plan = plan_sweep(config_files, axes, name, overrides, world_size=world)
        if slurm:
            write_slurm_script(plan, res, slurm, Path.cwd())
            typer.echo(f"{len(plan.points)} point(s); SLURM job array: {slurm} (submit with "
                       f"`sbatch {slurm}`, then `llmctl compare {plan.folder}`)")
            return
        if dry_run:
            write_point_configs(plan)
            for point in plan.points:
                typer.echo(train_command(point))
            return
        outcome = run_sweep(plan, echo=typer.echo)
    if outcome.stopped_by:
        raise typer.Exit(1)
    if len(outcome.failed) < len(plan.points):
        _final_comparison(plan, x)
    if outcome.failed:
        typer.echo(f"{len(outcome.failed)} point(s) failed: {', '.join(outcome.failed)}; "
                   "rerun the sweep to retry them", err=True)
        raise typer.Exit(1)


def _final_comparison(plan: Any, x: str) -> None:
    from ..experiments.compare import compare_runs, write_reports
    from .compare import show_comparison

    with user_errors():
        result = compare_runs([p.folder for p in plan.points], plan.folder / "comparison.png",
                              x=x, title=f"sweep {plan.name}")
        write_reports(result, markdown=plan.folder / "comparison.md",
                      json_path=plan.folder / "comparison.json")
    show_comparison(result)
    typer.echo(f"table: {plan.folder / 'comparison.md'}")
