"""SIGINT / SIGTERM become a request to stop after the current step (a second one is fatal)."""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# torchrun forwards the terminal's Ctrl-C to workers that already got it: signals this close
# together count as one request.
_ESCALATE_AFTER_S = 1.0


class StopRequest:
    """While active, the first SIGINT/SIGTERM sets `requested`; a later one acts as usual."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.requested is None:
            self.requested, self._first_at = signal.Signals(signum).name, now
            return
        if now - self._first_at < _ESCALATE_AFTER_S:
            return
        # A second, deliberate signal does not wait for the step to finish.
        self.__exit__()
        signal.raise_signal(signum)
