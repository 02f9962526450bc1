"""llmctl train."""

from __future__ import annotations

from ._common import not_implemented


def train() -> None:
    """(not implemented yet)"""
    not_implemented("train")
