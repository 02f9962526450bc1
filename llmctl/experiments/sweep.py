"""Sweeps: a grid of config values expanded into points, every point validated before any
trains, then trained one after another (restartably) or handed to a scheduler.

Each point is written as a complete, resolved config file `out_dir/NAME/POINT/sweep_point.json`
(with `resume: auto` and `save_model: true`), so `llmctl train -c that-file` is the point:
the sweep, `--dry-run` commands and the SLURM array all train the same thing.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RunConfig, load_config
from ..config.schema import BLOCK_FIELDS
from ..core.errors import ConfigError, LlmctlError, Problem, did_you_mean
from ..core.files import write_json_atomic, write_text_atomic
from ..runtime.checkpoint import CheckpointError, has_checkpoint, read_checkpoint

POINT_CONFIG = "sweep_point.json"
MANIFEST = "sweep.json"
LATEST = "latest"  # train.run_folder.LATEST (kept literal: the sweep only reads the folder)
# The sweep owns where each point goes and how it restarts.
RESERVED_KEYS = ("out_dir", "file_name", "resume", "wandb_run_name")
# every point is validated (and its config written) before any trains: a bigger grid is a
# typo's product (seed=1..100 x three axes), not a sweep
MAX_POINTS = 10_000
_LAYER_KEY = re.compile(r"^(?:model\.)?layers\[(\d+)\]\.(\w+)$")
_SECTION = re.compile(r"^(?:model|train)\.(\w+)$")


@dataclass
class Axis:
    """One `--set KEY=V1,V2,...`."""

    key: str
    values: list[str]


@dataclass
class Point:
    index: int
    name: str
    settings: dict[str, str]  # axis key -> value, in axis order
    run: RunConfig
    folder: Path

    @property
    def config_path(self) -> Path:
        return self.folder / POINT_CONFIG

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.settings.items())


@dataclass
class Sweep:
    name: str
    folder: Path  # out_dir/NAME
    axes: list[Axis]
    points: list[Point]
    base_files: list[Path] = field(default_factory=list)


# ------------------------------------------------------------------ the grid


def _split_values(text: str) -> list[str]:
    """Split on commas that are not inside brackets or quotes (a value may be JSON)."""
    values, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    values.append("".join(current).strip())
    return values


def parse_set(spec: str) -> Axis:
    """`attn=gqa,mla` -> Axis('attn', ['gqa', 'mla'])."""
    key, sep, rest = spec.partition("=")
    key = key.strip()
    if not sep or not key:
        raise LlmctlError(f"--set {spec!r}: expected KEY=VALUE[,VALUE...], e.g. attn=gqa,mla")
    values = _split_values(rest)
    if any(v == "" for v in values):
        raise LlmctlError(f"--set {spec!r}: empty value (values are separated by commas)")
    if len(set(values)) != len(values):
        raise LlmctlError(f"--set {spec!r}: a value is repeated")
    return Axis(key, values)


def check_axes(axes: Sequence[Axis]) -> None:
    problems = []
    seen: set[str] = set()
    for axis in axes:
        bare = _flat_key(axis.key)
        if bare in RESERVED_KEYS:
            problems.append(Problem(axis.key, "the sweep sets it for every point (out_dir/"
                                    "NAME/POINT, resume auto); it cannot be swept", "--set"))
        if axis.key in seen:
            problems.append(Problem(axis.key, "given in two --set options", "--set"))
        seen.add(axis.key)
    points = math.prod(len(axis.values) for axis in axes)
    if points > MAX_POINTS:
        sizes = " x ".join(str(len(axis.values)) for axis in axes)
        problems.append(Problem(axes[0].key, f"the grid holds {sizes} = {points:,} points, "
                                f"more than {MAX_POINTS:,}; sweep fewer values", "--set"))
    if problems:
        raise ConfigError(problems)


def _flat_key(key: str) -> str:
    m = _SECTION.match(key)
    return m[1] if m else key


def expand_grid(axes: Sequence[Axis]) -> list[dict[str, str]]:
    """The cartesian product, first axis slowest: [{key: value, ...}, ...]."""
    if not axes:
        return [{}]
    return [dict(zip([a.key for a in axes], combo, strict=True))
            for combo in itertools.product(*(a.values for a in axes))]


def point_name(settings: Mapping[str, str]) -> str:
    """`attn-gqa__pos_emb-rope`: a folder name that reads as the point's settings."""
    if not settings:
        return "base"
    parts = []
    for key, value in settings.items():
        key = re.sub(r"[^A-Za-z0-9_.-]+", "", key.replace("[", "").replace("]", ""))
        value = re.sub(r"[^A-Za-z0-9_.+-]+", "_", Path(value).name if "/" in value else value)
        parts.append(f"{key}-{value.strip('_')[:40]}")
    return "__".join(parts)


# ------------------------------------------------------------------ one point's config


def build_point_config(base_files: Sequence[Path], settings: Mapping[str, str],
                       overrides: Mapping[str, Any] | None = None,
                       world_size: int = 1) -> RunConfig:
    """The base config(s) + flag overrides + this point's settings, validated.

    Flat keys (`attn`, `train.learning_rate`) act as flags; per-layer keys (`layers[2].attn`)
    change one entry of the resolved layer list. Raises ConfigError.
    """
    flat: dict[str, Any] = dict(overrides or {})
    per_layer = []
    for key, value in settings.items():
        m = _LAYER_KEY.match(key)
        if m:
            per_layer.append((int(m[1]), m[2], key, value))
        else:
            flat[_flat_key(key)] = value
    if not per_layer:
        return load_config(*base_files, overrides=flat, world_size=world_size)
    tree = load_config(*base_files, overrides=flat, check_batch_split=False).to_dict()
    problems = []
    for index, name, key, value in per_layer:
        n = len(tree["layers"])
        if name not in BLOCK_FIELDS:
            problems.append(Problem(key, "unknown layer key" + did_you_mean(name, BLOCK_FIELDS),
                                    "--set"))
        elif index >= n:
            problems.append(Problem(key, f"the model has {n} layer(s): layers[0] to "
                                    f"layers[{n - 1}]", "--set"))
        else:
            tree["layers"][index][name] = value
    if problems:
        raise ConfigError(problems)
    return load_config(tree, world_size=world_size)


def plan_sweep(base_files: Sequence[Path], axes: Sequence[Axis], name: str | None = None,
               overrides: Mapping[str, Any] | None = None, world_size: int = 1) -> Sweep:
    """Expand and validate every point; one ConfigError naming each bad point's problems."""
    check_axes(axes)
    name = name or (Path(base_files[0]).stem if base_files else "sweep")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or name in (".", ".."):
        raise LlmctlError(f"--name {name!r}: use letters, digits and _ . + - only")
    problems: list[Problem] = []
    points: list[Point] = []
    used: set[str] = set()
    grid = expand_grid(axes)
    for index, settings in enumerate(grid):
        pname = point_name(settings)
        if pname in used:
            pname = f"{pname}-{index}"
        used.add(pname)
        try:
            run = build_point_config(base_files, settings, overrides, world_size)
        except ConfigError as err:
            label = " ".join(f"{k}={v}" for k, v in settings.items()) or "base"
            problems += [Problem(f"point {index + 1}/{len(grid)} ({label}): {p.key}",
                                 p.message, p.origin) for p in err.problems]
            continue
        folder = Path(run.train.out_dir).expanduser() / name / pname
        train = dataclasses.replace(run.train, out_dir=str(folder.parent), file_name=pname,
                                    resume="auto", save_model=True,
                                    wandb_run_name=f"{name}-{pname}")
        points.append(Point(index, pname, dict(settings), RunConfig(run.model, train), folder))
    if problems:
        raise ConfigError(problems)
    folder = points[0].folder.parent
    return Sweep(name, folder, list(axes), points, [Path(p) for p in base_files])


def write_point_configs(sweep: Sweep) -> None:
    """The resolved config of every point, and the sweep's manifest (atomic writes)."""
    for point in sweep.points:
        try:
            point.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LlmctlError(f"cannot create {point.folder}: {err.strerror or err}") from None
        write_json_atomic(point.config_path, point.run.to_dict())
    write_json_atomic(sweep.folder / MANIFEST, {
        "name": sweep.name, "base_configs": [str(p) for p in sweep.base_files],
        "axes": {a.key: a.values for a in sweep.axes},
        "points": [{"index": p.index, "name": p.name, "settings": p.settings,
                    "config": str(p.config_path)} for p in sweep.points]})


# ------------------------------------------------------------------ running


def finished_step(point: Point) -> int:
    """The step of the point's latest checkpoint (0 when it has none)."""
    latest = point.folder / LATEST
    if not has_checkpoint(latest):
        return 0
    try:
        return read_checkpoint(latest).step
    except CheckpointError:
        return 0


def is_done(point: Point) -> bool:
    return finished_step(point) >= point.run.train.max_iters


@dataclass
class SweepOutcome:
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    stopped_by: str | None = None  # a signal stopped the sweep (the point saved latest)


def run_sweep(sweep: Sweep, echo: Callable[[str], None] = print,
              verbose: bool = True) -> SweepOutcome:
    """Train the points one after another in this process.

    In-process (not subprocesses) so that killing the sweep kills its training with it:
    nothing is left running to race a restarted sweep, and the restart resumes the
    interrupted point from its latest checkpoint exactly as `llmctl train --resume auto`.
    """
    from ..train.trainer import train

    write_point_configs(sweep)
    outcome = SweepOutcome()
    total = len(sweep.points)
    for point in sweep.points:
        head = f"[{point.index + 1}/{total}] {point.name}"
        step = finished_step(point)
        if step >= point.run.train.max_iters:
            echo(f"{head}: done (step {step}), skipped")
            outcome.skipped.append(point.name)
            continue
        echo(f"{head}: " + (f"resuming at step {step}" if step else "training"))
        # the point's own file, read back: exactly what `llmctl train -c` would train
        run = load_config(point.config_path)
        try:
            result = train(run, verbose=verbose)
        except LlmctlError as err:
            echo(f"{head}: failed: {err}")
            outcome.failed[point.name] = str(err)
            continue
        if result.stopped_by:
            echo(f"{head}: stopped by {result.stopped_by} at step {result.step}; rerun the "
                 "same sweep command to continue")
            outcome.stopped_by = result.stopped_by
            return outcome
        outcome.trained.append(point.name)
    return outcome


# ------------------------------------------------------------------ schedulers


def train_command(point: Point) -> str:
    return shlex.join(["llmctl", "train", "--config", str(point.config_path)])


@dataclass
class SlurmResources:
    nodes: int = 1
    gpus_per_node: int = 0  # 0: one CPU process per node
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    mem: str | None = None
    extra: list[str] = field(default_factory=list)  # more `#SBATCH` lines, e.g. --qos=high

    @property
    def procs_per_node(self) -> int:
        return max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


def slurm_script(sweep: Sweep, res: SlurmResources, workdir: Path) -> str:
    """A job-array script: array index i trains point i through `srun torchrun`."""
    n = len(sweep.points)
    logs = sweep.folder / "slurm-%A_%a.out"
    lines = ["#!/bin/bash",
             f"# llmctl sweep {sweep.name}: {n} point(s), one array index each. Submit with",
             "#   sbatch THIS_FILE        (compare afterwards: llmctl compare "
             f"{shlex.quote(str(sweep.folder))})",
             f"#SBATCH --job-name={sweep.name}",
             f"#SBATCH --array=0-{n - 1}",
             f"#SBATCH --nodes={res.nodes}",
             "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --output={logs}"]
    if res.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={res.gpus_per_node}")
    for flag, value in (("cpus-per-task", res.cpus_per_task), ("time", res.time),
                        ("partition", res.partition), ("account", res.account),
                        ("mem", res.mem)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"#SBATCH {extra}" for extra in res.extra]
    configs = "\n".join(f"  {shlex.quote(str(p.config_path))}  # {p.index}: {p.label}"
                        for p in sweep.points)
    if res.nodes > 1:
        rdzv = ('--nnodes="$SLURM_JOB_NUM_NODES" --rdzv_backend=c10d '
                '--rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" '
                '--rdzv_id="${SLURM_JOB_ID}_${SLURM_ARRAY_TASK_ID}"')
        head = ('MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
                "export MASTER_ADDR\n")
    else:
        rdzv, head = "--standalone", ""
    lines += ["set -euo pipefail",
              # relative paths in the point configs (data_dir, out_dir) mean this folder
              f"cd {shlex.quote(str(Path(workdir).resolve()))}",
              "CONFIGS=(", configs, ")",
              ': "${SLURM_ARRAY_TASK_ID:?run this script with sbatch (a job array)}"',
              f'if (( SLURM_ARRAY_TASK_ID < 0 || SLURM_ARRAY_TASK_ID >= {n} )); then',
              f'  echo "array index $SLURM_ARRAY_TASK_ID: this sweep has {n} points" >&2',
              "  exit 2",
              "fi",
              'CONFIG="${CONFIGS[$SLURM_ARRAY_TASK_ID]}"',
              'echo "point $SLURM_ARRAY_TASK_ID: $CONFIG"',
              head + f"srun torchrun {rdzv} --nproc_per_node={res.procs_per_node} "
              '-m llmctl train --config "$CONFIG"', ""]
    return "\n".join(lines)


def write_slurm_script(sweep: Sweep, res: SlurmResources, path: Path, workdir: Path) -> None:
    write_point_configs(sweep)
    try:
        write_text_atomic(path, slurm_script(sweep, res, workdir))
        path.chmod(0o755)
    except OSError as err:
        raise LlmctlError(f"cannot write {path}: {err.strerror or err}") from None
