"""The loss-curve PNG written into the run folder at the end of training."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..core.files import atomic_path

PLOT_FILE = "loss_curve.png"


def plot_loss_curve(records: Iterable[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Train loss per logged step, and eval train/val loss, against step (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = list(records)
    train = [(r["step"], r["loss"]) for r in records
             if r.get("kind") == "train" and r.get("loss") is not None]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    try:
        if train:
            steps, losses = zip(*train, strict=True)
            ax.plot(steps, losses, label="train (logged)", color="tab:blue", alpha=0.5, lw=1)
        for key, color in (("train_loss", "tab:blue"), ("val_loss", "tab:orange")):
            points = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
            if points:
                steps, losses = zip(*points, strict=True)
                ax.plot(steps, losses, marker="o", color=color,
                        label=f"{key.split('_')[0]} (eval)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title or "loss")
        ax.grid(alpha=0.3)
        ax.legend()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
