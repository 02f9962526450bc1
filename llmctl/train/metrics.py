"""Where training metrics go: metrics.jsonl in the run folder and the console."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ..core.errors import LlmctlError
from ..core.files import JSONL_RECORD_LIMIT, UserFileError, atomic_file, bounded_lines, open_regular
from ..core.units import human_count, human_duration

METRICS_FILE = "metrics.jsonl"


class MetricsFile:
    """One JSON object per line; each record is a single append of a whole line."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        """Append one record whole, or not at all: a write that fails or comes up short (a
        full disk) is undone by truncating back to the previous size, so no torn line
        stays behind for the next append to glue onto."""
        data = (json.dumps(_finite(record), separators=(",", ":")) + "\n").encode("utf-8")
        try:  # a FIFO put there since the run folder was checked cannot block
            fd = open_regular(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "metrics file",
                              follow_links=True)
        except UserFileError as err:
            raise LlmctlError(f"cannot append to {self.path}: {err.reason}") from None
        except OSError as err:
            raise LlmctlError(f"cannot append to {self.path}: {err.strerror or err}") from None
        try:
            size = os.fstat(fd).st_size  # one writer per run folder: nobody else appends
            try:
                written = os.write(fd, data)  # one write: never interleaved with another
            except OSError as err:
                _truncate(fd, size)
                raise LlmctlError(f"cannot append to {self.path}: "
                                  f"{err.strerror or err}") from None
            if written != len(data):
                _truncate(fd, size)
                raise LlmctlError(f"cannot append to {self.path}: only {written} of "
                                  f"{len(data)} bytes were written (is the disk full?); the "
                                  "partial record was removed")
        finally:
            os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (written by a run that died after its last checkpoint)."""
        if not self.path.exists():
            return
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        try:
            with atomic_file(self.path, "w", encoding="utf-8") as f:
                for record in kept:
                    f.write(json.dumps(record, separators=(",", ":")) + "\n")
        except OSError as err:
            raise LlmctlError(f"cannot rewrite {self.path}: {err.strerror or err}") from None


def _truncate(fd: int, size: int) -> None:
    with contextlib.suppress(OSError):  # shrinking needs no space; nothing more to do if not
        os.ftruncate(fd, size)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a torn last line (crash mid-write) is skipped."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in bounded_lines(f, JSONL_RECORD_LIMIT):  # an endless line is no record
            try:
                record = json.loads(line) if line is not None else None
            except json.JSONDecodeError:
                continue
            record = checked_record(record)
            if record is not None:
                records.append(record)
    return records


# the fields readers compute with (compare, the loss plot), by kind of value
_NUMBERS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gb", "tokens", "time",
            "train_loss", "val_loss", "aux_loss")
_NUMBER_LISTS = ("mtp_loss", "imbalance")


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def checked_record(record: Any) -> dict[str, Any] | None:
    """A metrics record as data: None unless a JSON object with a string `kind` and a whole
    `step` >= 0; a known field of the wrong kind of value (a string loss, an infinite time) is
    None, as an unknown value is written."""
    if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
        return None
    step = record.get("step")
    if type(step) is not int or step < 0:
        return None
    record = dict(record)
    for key in _NUMBERS:
        if key in record and not _is_number(record[key]):
            record[key] = None
    for key in _NUMBER_LISTS:
        value = record.get(key)
        if key in record and not (isinstance(value, list) and all(map(_is_number, value))):
            record[key] = None
    return record


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN/inf; such values are written as null.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}


# ------------------------------------------------------------------------------ console


def format_record(record: dict[str, Any], total: int) -> str:
    """`step 10/500 | loss 4.1234 | lr 3.00e-04 | ...` for one train record."""
    parts = [f"step {record['step']}/{total}", f"loss {record['loss']:.4f}",
             f"lr {record['lr']:.2e}"]
    if record.get("grad_norm") is not None:
        parts.append(f"grad {record['grad_norm']:.3f}")
    if record.get("aux_loss"):
        parts.append(f"aux {record['aux_loss']:.4f}")
    if record.get("mtp_loss"):
        parts.append("mtp " + ",".join(f"{v:.4f}" for v in record["mtp_loss"]))
    if record.get("imbalance"):
        parts.append("imb " + ",".join(f"{v:.2f}" for v in record["imbalance"]))
    parts.append(f"{human_count(record['tokens_per_s'], billions='G')} tok/s")
    if record.get("mfu") is not None:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    if record.get("memory_gb") is not None:
        parts.append(f"mem {record['memory_gb']:.2f}GB")
    return " | ".join(parts)


class Console:
    """A progress bar with ETA on a terminal; plain lines (one per log) otherwise."""

    def __init__(self, total: int, start: int, *, enabled: bool = True,
                 stream: TextIO | None = None):
        self.total, self.start_step, self.enabled = total, start, enabled
        self.stream = stream or sys.stdout
        self.tty = enabled and self.stream.isatty()
        self._progress = None
        self._task = None
        self._t0 = time.perf_counter()

    def __enter__(self) -> Console:
        self._t0 = time.perf_counter()  # the ETA counts training time, not setup
        if self.tty:
            from rich.console import Console as RichConsole
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.description}"),
                console=RichConsole(file=self.stream), transient=False)
            self._progress.start()
            self._task = self._progress.add_task("", total=self.total, completed=self.start_step)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = format_record(record, self.total)
        if self._progress is not None:
            self._progress.update(self._task, description=f"loss {record['loss']:.4f}")
            self._progress.console.print(line, highlight=False)
        else:
            done = record["step"] - self.start_step
            left = self.total - record["step"]
            elapsed = time.perf_counter() - self._t0
            eta = f" | eta {human_duration(elapsed / done * left)}" if done > 0 else ""
            self.info(line + eta)

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(message, highlight=False, markup=False)
        else:
            print(message, file=self.stream, flush=True)
