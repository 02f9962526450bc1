"""Activation recomputation per block, and a flag telling modules they are being recomputed.

Non-reentrant checkpointing runs a block's forward a second time during backward. Modules with
side effects (MoE load counters) check `is_recomputing()` so nothing is counted twice.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.checkpoint import checkpoint

_state = threading.local()


def is_recomputing() -> bool:
    return getattr(_state, "recomputing", False)


@contextlib.contextmanager
def _recomputing() -> Iterator[None]:
    previous = is_recomputing()
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = previous


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _recomputing()


def checkpointed(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) with its activations recomputed in backward instead of stored."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts)
