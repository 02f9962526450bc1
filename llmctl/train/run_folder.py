"""The run folder (out_dir/file_name): where it is, that it is writable, and that a fresh run
does not mix with an earlier one."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..config import RunConfig
from ..core.errors import LlmctlError
from ..runtime.checkpoint import has_checkpoint

LATEST, BEST = "latest", "best"


def run_dir(run: RunConfig) -> Path:
    return Path(run.train.out_dir).expanduser() / run.train.file_name


def prepare_run_dir(path: Path) -> Path:
    """Create the run folder and prove it is writable (before any training time is spent)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise LlmctlError(f"cannot write to the run folder {path}: {reason} (choose another "
                          "--out_dir)") from None
    return path


def check_fresh_start(folder: Path, *, set_aside_metrics: bool) -> None:
    """Before a run that resumes nothing: refuse a folder holding an earlier run's
    checkpoints (mixing them would leave e.g. a stale best/ that sample and eval pick), and
    set an earlier metrics.jsonl aside rather than appending to it. Nothing is deleted."""
    earlier = [name for name in (LATEST, BEST) if has_checkpoint(folder / name)]
    if earlier:
        raise LlmctlError(
            f"the run folder {folder} already holds checkpoints of an earlier run "
            f"({', '.join(n + '/' for n in earlier)}): continue it with --resume auto, or start "
            "a new run under another --file_name (or --out_dir), or remove the folder")
    metrics = folder / "metrics.jsonl"
    if set_aside_metrics and metrics.is_file():
        stamp = int(metrics.stat().st_mtime)
        aside = folder / f"metrics.{stamp}.jsonl"
        n = 1
        while aside.exists():
            aside, n = folder / f"metrics.{stamp}-{n}.jsonl", n + 1
        metrics.rename(aside)
