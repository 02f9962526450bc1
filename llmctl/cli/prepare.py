"""llmctl prepare."""

from __future__ import annotations

from ._common import not_implemented


def prepare() -> None:
    """(not implemented yet)"""
    not_implemented("prepare")
