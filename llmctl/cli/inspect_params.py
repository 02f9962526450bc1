"""llmctl inspect-params."""

from __future__ import annotations

from ._common import not_implemented


def inspect_params() -> None:
    """(not implemented yet)"""
    not_implemented("inspect-params")
