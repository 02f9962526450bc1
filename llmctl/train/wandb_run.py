"""Weights & Biases logging; the run id is kept in checkpoints so a resume continues the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import LlmctlError


class WandbRun:
    """A wandb run in `run_dir/wandb` (WANDB_MODE=offline works without a network)."""

    def __init__(self, *, project: str, name: str | None, config: dict[str, Any], run_dir: Path,
                 run_id: str | None = None):
        try:
            import wandb
        except ImportError:  # pragma: no cover - wandb is a dependency
            raise LlmctlError("--wandb_log needs the wandb package: pip install wandb") from None
        self._wandb = wandb
        try:
            self.run = wandb.init(project=project, name=name, config=config, dir=str(run_dir),
                                  id=run_id, resume="allow" if run_id else None,
                                  settings=wandb.Settings(quiet=True))
        except Exception as err:  # login / network / permission problems
            raise LlmctlError(f"could not start Weights & Biases logging: {err} (log in with "
                              "`wandb login`, or set WANDB_MODE=offline)") from None

    @property
    def id(self) -> str:
        return self.run.id

    def log(self, record: dict[str, Any], step: int) -> None:
        flat = {}
        for key, value in record.items():
            if key in ("step", "kind") or value is None:
                continue
            if key == "mtp_loss":  # per MTP depth (1 = two tokens ahead) → one chart each
                flat.update({f"{key}/depth_{i + 1}": v for i, v in enumerate(value)})
            elif isinstance(value, list):  # per-layer values → one chart each
                flat.update({f"{key}/layer_{i}": v for i, v in enumerate(value)})
            else:
                flat[key] = value
        self.run.log(flat, step=step)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
