"""Comparing runs: read each run folder (as far as it goes), one figure of their loss
curves, and one table of their sizes, speeds and losses."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RunConfig, load_config
from ..config.schema import MODEL_FIELDS, TRAIN_FIELDS
from ..core.errors import LlmctlError
from ..core.files import atomic_path, write_json_atomic, write_text_atomic
from ..core.units import human_count, human_duration
from ..runtime.checkpoint import CheckpointError, has_checkpoint, read_checkpoint
from ..train.metrics import METRICS_FILE, read_metrics
from .sweep import POINT_CONFIG

X_AXES = ("step", "tokens", "time", "flops")
X_LABELS = {"step": "optimizer step", "tokens": "tokens seen", "time": "training time (s)",
            "flops": "training FLOPs (estimate)"}
# Settings that name or place a run rather than define the experiment.
_NOT_COMPARED = {"out_dir", "file_name", "resume", "wandb_run_name", "wandb_project",
                 "wandb_log", "save_model", "ckpt_interval", "log_interval"}
FIGURE_SIZE = (12, 4.8)  # inches, at FIGURE_DPI: a 1200 x 480 PNG
FIGURE_DPI = 100


@dataclass
class RunData:
    folder: Path
    records: list[dict[str, Any]]
    run: RunConfig | None  # None when the folder holds no readable config
    label: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def train_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == "train"
                and r.get("loss") is not None and r.get("step") is not None]

    @property
    def val_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == "eval"
                and r.get("val_loss") is not None and r.get("step") is not None]


# ------------------------------------------------------------------ finding and reading


def _looks_like_run(path: Path) -> bool:
    return ((path / METRICS_FILE).is_file() or (path / POINT_CONFIG).is_file()
            or any(has_checkpoint(path / n) for n in ("latest", "best")))


def find_runs(paths: Sequence[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Run folders among `paths` (a run folder, or a folder of run folders) and the
    (folder, reason) of each folder skipped for having no metrics."""
    runs: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for path in paths:
        path = Path(path).expanduser()
        if not path.is_dir():
            raise LlmctlError(f"{path}: " + ("not a folder" if path.exists() else
                                             "no such folder"))
        candidates = [path] if _looks_like_run(path) else sorted(
            p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not candidates:
            skipped.append((path, f"no {METRICS_FILE} and no run folders inside"))
        for folder in candidates:
            metrics = folder / METRICS_FILE
            if not metrics.is_file():
                skipped.append((folder, f"no {METRICS_FILE} (not started, or not a run)"))
            elif folder not in runs:
                runs.append(folder)
    return runs, skipped


def _read_config(folder: Path) -> tuple[RunConfig | None, str | None]:
    """The run's config: the sweep's point file, else its checkpoint's."""
    if (folder / POINT_CONFIG).is_file():
        try:
            return load_config(folder / POINT_CONFIG, check_batch_split=False), None
        except LlmctlError as err:
            return None, f"unreadable {POINT_CONFIG}: {str(err).splitlines()[0]}"
    for name in ("latest", "best"):
        if has_checkpoint(folder / name):
            try:
                return read_checkpoint(folder / name).run, None
            except CheckpointError as err:
                return None, f"unreadable checkpoint: {str(err).splitlines()[0]}"
    return None, "no config (no checkpoint yet): sizes unknown"


def read_run(folder: Path) -> RunData:
    try:
        records = read_metrics(folder / METRICS_FILE)
    except (OSError, UnicodeDecodeError) as err:
        raise LlmctlError(f"cannot read {folder / METRICS_FILE}: {err}") from None
    run, note = _read_config(folder)
    return RunData(folder, records, run, notes=[note] if note else [])


def read_runs(paths: Sequence[Path]) -> tuple[list[RunData], list[tuple[Path, str]]]:
    """Every run with at least one record; folders without any are skipped with a reason."""
    folders, skipped = find_runs(paths)
    runs = []
    for folder in folders:
        data = read_run(folder)
        if data.records:
            runs.append(data)
        else:
            skipped.append((folder, f"{METRICS_FILE} has no records yet"))
    label_runs(runs)
    return runs, skipped


# ------------------------------------------------------------------ what differs


def comparable_settings(run: RunConfig, per_layer: bool) -> dict[str, Any]:
    """Flat key -> value of everything that defines the experiment."""
    out: dict[str, Any] = {}
    if per_layer:
        for i, layer in enumerate(run.model.layers):
            out.update({f"layers[{i}].{k}": v for k, v in dataclasses.asdict(layer).items()})
    else:
        out.update(dataclasses.asdict(run.model.layers[0]))
    out.update({k: getattr(run.model, k) for k in MODEL_FIELDS})
    out.update({k: getattr(run.train, k) for k in TRAIN_FIELDS if k not in _NOT_COMPARED})
    return out


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def label_runs(runs: Sequence[RunData]) -> None:
    """Label each run by the settings that differ between the runs (`attn=mla pos_emb=sin`)."""
    configured = [r for r in runs if r.run is not None]
    per_layer = not all(r.run.model.homogeneous for r in configured)
    settings = [comparable_settings(r.run, per_layer) for r in configured]
    keys = list(dict.fromkeys(k for s in settings for k in s))
    differing = [k for k in keys if len({_show(s.get(k)) for s in settings}) > 1]
    for run, values in zip(configured, settings, strict=True):
        run.label = " ".join(f"{k}={_show(values.get(k))}" for k in differing)
    for run in runs:
        run.label = run.label or run.name
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run in runs:
        if counts[run.label] > 1:
            run.label = f"{run.name} ({run.label})"


# ------------------------------------------------------------------ the table


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run_row(data: RunData) -> dict[str, Any]:
    """One table row, raw numbers (JSON-ready); None where unknown."""
    train, val = data.train_records, data.val_records
    last = train[-1] if train else {}
    row: dict[str, Any] = {
        "run": data.name, "label": data.label, "folder": str(data.folder),
        "step": max((r["step"] for r in data.records if r.get("step") is not None),
                    default=0),
        "max_iters": data.run.train.max_iters if data.run else None,
        "params_total": None, "params_active": None,
        "tokens": last.get("tokens"),
        "final_train_loss": last.get("loss"),
        "best_val_loss": min((r["val_loss"] for r in val), default=None),
        "final_val_loss": val[-1]["val_loss"] if val else None,
        # the median of the logged windows: robust to the first (warm-up) window
        "tokens_per_s": _median([r["tokens_per_s"] for r in train
                                 if r.get("tokens_per_s") is not None]),
        "mfu": _median([r["mfu"] for r in train if r.get("mfu") is not None]),
        "wall_time_s": last.get("time"),
        "imbalance": next((r["imbalance"] for r in reversed(train) if r.get("imbalance")),
                          None),
        "notes": list(data.notes),
    }
    if data.run is not None:
        from ..model.costs import inspect_model

        params = inspect_model(data.run.model)["params"]
        row["params_total"], row["params_active"] = params["total"], params["active_per_token"]
    return row


COLUMNS = ("run", "steps", "params", "active", "tokens", "best val", "final val",
           "final train", "tokens/s", "MFU", "wall time", "MoE imbalance")


def format_row(row: dict[str, Any]) -> dict[str, str]:
    """The row as the terminal / Markdown tables show it."""
    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    def count(value: Any) -> str:
        return "-" if value is None else human_count(value)

    steps = f"{row['step']}" + (f"/{row['max_iters']}" if row["max_iters"] else "")
    return {
        "run": row["label"], "steps": steps, "params": count(row["params_total"]),
        "active": count(row["params_active"]), "tokens": count(row["tokens"]),
        "best val": num(row["best_val_loss"], ".4f"),
        "final val": num(row["final_val_loss"], ".4f"),
        "final train": num(row["final_train_loss"], ".4f"),
        "tokens/s": "-" if row["tokens_per_s"] is None else human_count(
            row["tokens_per_s"], billions="G"),
        "MFU": "-" if row["mfu"] is None else f"{100 * row['mfu']:.2f}%",
        "wall time": "-" if row["wall_time_s"] is None else human_duration(row["wall_time_s"]),
        "MoE imbalance": "-" if not row["imbalance"] else " ".join(
            f"{v:.2f}" for v in row["imbalance"]),
    }


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    cells = [format_row(r) for r in rows]
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if c == "run" else "---:" for c in COLUMNS) + "|"]
    lines += ["| " + " | ".join(c[col].replace("|", "\\|") for col in COLUMNS) + " |"
              for c in cells]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the figure


def _x_values(data: RunData, steps: list[int], x: str) -> list[float]:
    if x == "step":
        return [float(s) for s in steps]
    train = data.train_records
    if x == "time":
        import numpy as np

        pairs = [(r["step"], r["time"]) for r in train if r.get("time") is not None]
        if not pairs:
            raise LlmctlError(f"{data.folder}: its metrics have no 'time'; use --x step")
        xs, ts = zip(*pairs, strict=True)
        return [float(t) for t in np.interp(steps, xs, ts)]
    if data.run is not None:
        per_step = data.run.train.total_batch_size
    else:
        known = [r for r in train if r.get("tokens") and r["step"]]
        if not known:
            raise LlmctlError(f"{data.folder}: no config and no 'tokens' in its metrics; "
                              "use --x step")
        per_step = known[-1]["tokens"] / known[-1]["step"]
    tokens = [s * per_step for s in steps]
    if x == "tokens":
        return tokens
    if data.run is None:
        raise LlmctlError(f"{data.folder}: no config to estimate FLOPs from; use --x tokens")
    from ..model.costs import training_flops_per_token

    per_token = training_flops_per_token(data.run.model)
    return [t * per_token for t in tokens]


def _log_helps(values: list[float], ratio: float) -> bool:
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) / min(positive) >= ratio


def plot_comparison(runs: Sequence[RunData], path: Path, x: str = "tokens",
                    log: str = "auto", title: str = "") -> Path:
    """Training loss (left) and validation loss (right) of every run against `x`.

    `log`: auto (x when it spans two decades, y when the loss spans a factor 3), x, y, xy,
    none. Written atomically.
    """
    if x not in X_AXES:
        raise LlmctlError(f"--x {x!r} is not one of {', '.join(X_AXES)}")
    if log not in ("auto", "x", "y", "xy", "none"):
        raise LlmctlError(f"--log {log!r} is not one of auto, x, y, xy, none")
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    colors = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20").colors
    all_x: list[float] = []
    all_y: list[float] = []
    try:
        for i, data in enumerate(runs):
            color = colors[i % len(colors)]
            train, val = data.train_records, data.val_records
            if train:
                xs = _x_values(data, [r["step"] for r in train], x)
                ys = [r["loss"] for r in train]
                ax_train.plot(xs, ys, color=color, lw=1.2, alpha=0.85, label=data.label)
                all_x += xs
                all_y += ys
            if val:
                xs = _x_values(data, [r["step"] for r in val], x)
                ys = [r["val_loss"] for r in val]
                ax_val.plot(xs, ys, color=color, lw=1.6, marker="o", ms=3, label=data.label)
                all_x += xs
                all_y += ys
        log_x = "x" in log or (log == "auto" and _log_helps(all_x, 100))
        log_y = "y" in log or (log == "auto" and _log_helps(all_y, 3))
        for ax, name in ((ax_train, "training loss (logged steps)"),
                         (ax_val, "validation loss (evaluations)")):
            ax.set_title(name)
            ax.set_xlabel(X_LABELS[x] + (" (log)" if log_x else ""))
            ax.set_ylabel("loss" + (" (log)" if log_y else ""))
            if log_x:
                ax.set_xscale("log")
            elif x in ("tokens", "flops"):  # 150k, not 150000
                ax.xaxis.set_major_formatter(FuncFormatter(
                    lambda v, _: human_count(v, digits=0 if v % 1000 == 0 else 1)))
            if log_y:
                ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
        if not any(data.val_records for data in runs):
            ax_val.text(0.5, 0.5, "no evaluations recorded\n(train with --eval)",
                        ha="center", va="center", transform=ax_val.transAxes, color="gray")
        handles, labels = ax_train.get_legend_handles_labels()
        if not handles:
            handles, labels = ax_val.get_legend_handles_labels()
        if handles:
            ax_val.legend(handles, labels, fontsize=8, loc="upper right")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=FIGURE_DPI)
    except OSError as err:
        raise LlmctlError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        plt.close(fig)
    return path


# ------------------------------------------------------------------ all of it


@dataclass
class Comparison:
    runs: list[RunData]
    rows: list[dict[str, Any]]
    skipped: list[tuple[Path, str]]
    figure: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {"runs": self.rows, "figure": str(self.figure) if self.figure else None,
                "skipped": [{"folder": str(p), "reason": why} for p, why in self.skipped]}


def compare_runs(paths: Sequence[Path], figure: Path | None, x: str = "tokens",
                 log: str = "auto", title: str = "") -> Comparison:
    """Read the runs, draw the figure (unless `figure` is None) and build the table rows."""
    runs, skipped = read_runs(paths)
    if not runs:
        listed = "; ".join(f"{p}: {why}" for p, why in skipped) or "nothing found"
        raise LlmctlError(f"no runs with metrics to compare ({listed})")
    rows = [run_row(r) for r in runs]
    drawn = plot_comparison(runs, figure, x=x, log=log, title=title) if figure else None
    return Comparison(runs, rows, skipped, drawn)


def write_reports(comparison: Comparison, markdown: Path | None = None,
                  json_path: Path | None = None) -> None:
    try:
        if markdown is not None:
            write_text_atomic(markdown, markdown_table(comparison.rows))
        if json_path is not None:
            write_json_atomic(json_path, comparison.to_json())
    except OSError as err:
        raise LlmctlError(f"cannot write the comparison: {err.strerror or err}") from None


def dumps(comparison: Comparison) -> str:
    return json.dumps(comparison.to_json(), indent=2)
