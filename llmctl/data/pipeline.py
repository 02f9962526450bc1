"""Tokenization with bounded memory: pieces -> work items -> worker processes -> split files.

Work items (~2M characters each) go to `num_proc` worker processes and come back in order;
at most two per worker are in flight, and tokens are appended to the split files as they
arrive, so neither the corpus nor its tokens are ever held whole.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import LlmctlError
from .sources.base import PIECE_CHARS, Piece
from .tokenizers import Tokenizer, tokenizer_from_spec


@dataclass
class WorkItem:
    split: str
    texts: list[str] = field(default_factory=list)
    eots: list[bool] = field(default_factory=list)  # end-of-text after texts[i]
    units: float = 0.0


def batch_pieces(pieces: Iterator[Piece], route: Callable[[], str],
                 target_chars: int = PIECE_CHARS) -> Iterator[WorkItem]:
    """Group pieces into work items of one split each; `route()` picks a document's split.

    An end-of-text follows every document that has any text (empty documents add nothing).
    """
    item: WorkItem | None = None
    size = 0
    doc_split: str | None = None
    doc_has_text = False
    for text, ends, units in pieces:
        if doc_split is None:
            doc_split = route()
        if item is not None and item.split != doc_split:
            yield item
            item = None
        if item is None:
            item, size = WorkItem(doc_split), 0
        if text or (ends and doc_has_text):
            item.texts.append(text)
            item.eots.append(ends)
            doc_has_text = doc_has_text or bool(text)
        item.units += units
        size += len(text)
        if ends:
            doc_split, doc_has_text = None, False
        if size >= target_chars:
            yield item
            item, size = None, 0
    if item is not None:
        yield item


def encode_item(tokenizer: Tokenizer, texts: list[str], eots: list[bool],
                dtype: str) -> np.ndarray:
    """The item's tokens, an end-of-text after each finished document, as `dtype`."""
    eot = np.array([tokenizer.eot_id], dtype=np.uint32)
    parts = []
    for text, ends in zip(texts, eots, strict=True):
        if text:
            parts.append(tokenizer.encode_array(text))
        if ends:
            parts.append(eot)
    if not parts:
        return np.empty(0, dtype=np.dtype(dtype).newbyteorder("<"))
    return np.concatenate(parts).astype(np.dtype(dtype).newbyteorder("<"), copy=False)


# ---------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _watch_parent(parent: int) -> None:
    """Exit when the parent dies (even by SIGKILL), instead of lingering forever."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _init_worker(spec: dict[str, Any], folder: str, dtype: str, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not a handler inherited through fork
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    inherited = _WORKER.get("tokenizer")  # a forked worker has the parent's already
    if inherited is None or inherited.spec != spec:
        _WORKER["tokenizer"] = tokenizer_from_spec(spec, folder)
    _WORKER["dtype"] = dtype


def _encode_in_worker(texts: list[str], eots: list[bool]) -> np.ndarray:
    return encode_item(_WORKER["tokenizer"], texts, eots, _WORKER["dtype"])


def default_start_method() -> str:
    """fork where it is safe (Linux, no other thread in this process), else spawn.

    Forked workers start in milliseconds with the tokenizer already built; spawned ones
    import everything and rebuild it from its spec and the files saved in the folder.
    """
    if sys.platform.startswith("linux") and threading.active_count() == 1:
        return "fork"
    return "spawn"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def worker_count(requested: int | None) -> int:
    """Tokenizer processes to start: the request capped at the usable cores (more only
    contend for them), by default the cores, at most 8."""
    cores = usable_cores()
    return min(requested, cores) if requested else min(8, cores)


class TokenizerPool:
    """Encodes work items in order: in this process, or in `num_proc` worker processes.

    Workers start only once a second work item exists (small inputs stay in-process).
    """

    def __init__(self, tokenizer: Tokenizer, folder: Path, dtype: str, num_proc: int,
                 start_method: str | None = None) -> None:
        self.tokenizer, self.folder, self.dtype = tokenizer, folder, dtype
        self.num_proc = max(1, num_proc)
        self.start_method = start_method
        self._executor: Any = None

    def _start(self) -> Any:
        if self._executor is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            method = self.start_method or default_start_method()
            _WORKER["tokenizer"] = self.tokenizer  # what forked workers inherit
            self._executor = ProcessPoolExecutor(
                max_workers=self.num_proc, mp_context=multiprocessing.get_context(method),
                initializer=_init_worker,
                initargs=(self.tokenizer.spec, str(self.folder), self.dtype, os.getpid()))
            self.start_method = method
        return self._executor

    def map(self, items: Iterator[WorkItem]) -> Iterator[tuple[WorkItem, np.ndarray]]:
        """(item, tokens) in input order; item.texts is emptied once sent."""
        items = iter(items)
        first = next(items, None)
        if first is None:
            return
        second = next(items, None)
        rest = [first] + ([second] if second is not None else [])
        if second is None or self.num_proc == 1:
            for item in itertools.chain(rest, items):
                yield item, encode_item(self.tokenizer, item.texts, item.eots, self.dtype)
            return
        yield from self._map_parallel(rest, items)

    def _map_parallel(self, rest: list[WorkItem], items: Iterator[WorkItem]
                      ) -> Iterator[tuple[WorkItem, np.ndarray]]:
        from concurrent.futures.process import BrokenProcessPool

        executor = self._start()
        pending: deque = deque()
        try:
            for source in (rest, items):
                for item in source:
                    pending.append((item, executor.submit(_encode_in_worker, item.texts,
                                                          item.eots)))
                    item.texts, item.eots = [], []
                    if len(pending) >= 2 * self.num_proc:
                        done, future = pending.popleft()
                        yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        except BrokenProcessPool:
            raise LlmctlError("a tokenizer worker process died (out of memory, or it could "
                              "not start); retry with a smaller --num_proc, or --num_proc 1 to "
                              "tokenize in this process") from None
        finally:
            for _, future in pending:
                future.cancel()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
            _WORKER.pop("tokenizer", None)

    def __enter__(self) -> TokenizerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------- writers


class SplitWriter:
    """Appends token arrays to a split file, tracking count, max id and sha256."""

    def __init__(self, path: Path, dtype: str) -> None:
        self.path = path
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.tokens = 0
        self.max_id = -1
        self._sha = hashlib.sha256()
        try:
            self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        except OSError as err:
            raise LlmctlError(f"cannot write {path}: {err.strerror or err}") from None

    def write(self, tokens: np.ndarray) -> None:
        if not len(tokens):
            return
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        try:
            self._file.write(tokens.data)
        except OSError as err:
            raise LlmctlError(f"cannot write {self.path}: {err.strerror or err}") from None
        self._sha.update(tokens.data)
        self.tokens += len(tokens)
        self.max_id = max(self.max_id, int(tokens.max()))

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
