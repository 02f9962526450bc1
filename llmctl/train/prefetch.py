"""Batches drawn on a background thread ahead of the step, so data loading never stalls it."""

from __future__ import annotations

import queue
import threading
from typing import Any, Protocol

import torch


class Sampler(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...


_DONE = object()


class Prefetcher:
    """Keeps `depth` batches ready (pinned on CUDA) and copies them to the device async.

    The sampler runs ahead of the training loop, so its own state is not the loop's: each
    batch carries the sampler state right after it was drawn, and `state_dict()` returns the
    state after the last batch handed out — restoring it replays exactly the batches the
    loop has not consumed yet.
    """

    def __init__(self, sampler: Sampler, device: torch.device, depth: int = 2):
        self.sampler, self.device = sampler, device
        self.pin = device.type == "cuda"
        self._state = sampler.state_dict()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="llmctl-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                x, y = self.sampler.next_batch()
                if self.pin:
                    x, y = x.pin_memory(), y.pin_memory()
                self._put((x, y, self.sampler.state_dict()))
        except BaseException as err:  # handed to the loop, raised there
            self._put(err)

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) on the device."""
        item = self._queue.get()
        if item is _DONE:
            raise RuntimeError("prefetcher is closed")
        if isinstance(item, BaseException):
            self.close()
            raise item
        x, y, self._state = item
        return (x.to(self.device, non_blocking=self.pin),
                y.to(self.device, non_blocking=self.pin))

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._queue.put_nowait(_DONE)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
