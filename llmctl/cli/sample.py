"""llmctl sample."""

from __future__ import annotations

from ._common import not_implemented


def sample() -> None:
    """(not implemented yet)"""
    not_implemented("sample")
