"""Bounds on parsed data: nesting depth and total size (YAML aliases counted per use)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from .errors import LlmctlError

SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # a recorded sha256: 64 lowercase hex digits
MAX_DEPTH = 32  # configs nest 4 deep; checkpoint JSON a little more
MAX_NODES = 1_000_000  # values visited, an alias counted once per use (alias bombs)


def structure_problem(value: Any, max_depth: int = MAX_DEPTH,
                      max_nodes: int = MAX_NODES) -> str | None:
    """Why `value` is too deep or too big (None when it is fine); walks without recursion
    and stops at the first bound, so a billion-node alias bomb costs `max_nodes` steps."""
    stack = [(value, 1)] if isinstance(value, (Mapping, list, tuple)) else []
    nodes = 1
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, Mapping) else item
        nodes += 2 * len(item) if isinstance(item, Mapping) else len(item)  # keys count too
        if nodes > max_nodes:
            return (f"holds more than {max_nodes:,} values (YAML aliases count once per use; "
                    "an alias bomb?)")
        if depth > max_depth and len(item):
            return f"is nested more than {max_depth} levels deep"
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, (Mapping, list, tuple)))
    return None


def loads_json(text: str, what: str) -> Any:
    """json.loads bounded by MAX_DEPTH / MAX_NODES; an LlmctlError naming `what` otherwise
    (json.JSONDecodeError passes through for callers that report line and column)."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise LlmctlError(f"{what} is nested more than {MAX_DEPTH} levels deep") from None
    problem = structure_problem(data)
    if problem:
        raise LlmctlError(f"{what} {problem}")
    return data
