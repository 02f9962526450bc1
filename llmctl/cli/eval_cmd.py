"""llmctl eval."""

from __future__ import annotations

from ._common import not_implemented


def eval_cmd() -> None:
    """(not implemented yet)"""
    not_implemented("eval")
