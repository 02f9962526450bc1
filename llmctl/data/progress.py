"""Progress of a tokenization pass: a rich bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from ..core.units import human_count

_PLAIN_EVERY_S = 10.0
_RICH_EVERY_S = 0.1
_SCALE = 10_000  # the bar's resolution when the size is known


class Progress:
    """Tracks units of the source read (bytes or rows) and tokens written.

    The fraction done is the larger of units / total and tokens / max_tokens, whichever is
    known; with neither, only counts and rates are shown.
    """

    def __init__(self, label: str, total: float | None = None, unit: str = "B",
                 max_tokens: int | None = None, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.label, self.total, self.unit, self.max_tokens = label, total, unit, max_tokens
        self.units = 0.0
        self.tokens = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self._start = time.perf_counter()
        self._last_plain = self._start
        self._rich: Any = None
        self._task: Any = None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    @property
    def rate(self) -> float:
        return self.tokens / max(self.elapsed, 1e-9)

    @property
    def fraction(self) -> float | None:
        parts = []
        if self.total:
            parts.append(self.units / self.total)
        if self.max_tokens:
            parts.append(self.tokens / self.max_tokens)
        return min(1.0, max(parts)) if parts else None

    def __enter__(self) -> Progress:
        self._start = self._last_plain = time.perf_counter()
        if self.enabled and self.stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            known = self.fraction is not None
            self._rich = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(),
                TaskProgressColumn() if known else TextColumn(""),
                TextColumn("{task.fields[tokens]} tok  {task.fields[rate]} tok/s"),
                TimeElapsedColumn(), TimeRemainingColumn() if known else TextColumn(""),
                # No refresh thread: tokenizer workers may be forked while this bar runs.
                console=Console(file=self.stream), transient=False, auto_refresh=False)
            self._rich.start()
            self._task = self._rich.add_task(self.label, total=_SCALE if known else None,
                                             tokens="0", rate="-")
        return self

    def advance(self, units: float, tokens: int) -> None:
        self.units += units
        self.tokens += tokens
        if not self.enabled:
            return
        if self._rich is not None:
            now = time.perf_counter()
            if now - self._last_plain < _RICH_EVERY_S:
                return
            self._last_plain = now
            fraction = self.fraction
            self._rich.update(self._task, tokens=human_count(self.tokens, 2, 'G'),
                              rate=human_count(self.rate, 2, 'G'),
                              completed=fraction * _SCALE if fraction is not None else None)
            self._rich.refresh()
        elif time.perf_counter() - self._last_plain >= _PLAIN_EVERY_S:
            self._last_plain = time.perf_counter()
            self._plain_line()

    def _plain_line(self, final: bool = False) -> None:
        fraction = self.fraction
        done = f" {fraction:6.1%}" if fraction is not None else ""
        eta = ""
        if fraction and not final and fraction < 1:
            eta = f" ETA {self.elapsed * (1 - fraction) / fraction:.0f}s"
        rate = human_count(self.rate, 2, "G")
        print(f"{self.label}:{done} {self.tokens:,} tokens, {rate} tok/s, "
              f"{self.elapsed:.1f}s{eta}{' done' if final else ''}", file=self.stream,
              flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            fraction = 1.0 if exc[0] is None and self.fraction is not None else self.fraction
            self._rich.update(self._task, tokens=human_count(self.tokens, 2, 'G'),
                              rate=human_count(self.rate, 2, 'G'),
                              completed=fraction * _SCALE if fraction is not None else None)
            self._rich.refresh()
            self._rich.stop()
        elif self.enabled and exc[0] is None:
            self._plain_line(final=True)
