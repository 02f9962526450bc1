"""Errors that mean "bad input": the CLI prints them without a traceback and exits non-zero."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PREVIEW_CHARS = 60


class LlmctlError(Exception):
    """A problem with what the user gave us (a path, a checkpoint, a dataset...)."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    key: str  # dotted key, e.g. "layers[3].n_kv_heads", or a file path for unreadable files
    message: str
    origin: str | None = None  # where the value came from: a file, a flag

    def __str__(self) -> str:
        where = f" (from {self.origin})" if self.origin else ""
        return f"{self.key}: {self.message}{where}"


class ConfigError(LlmctlError):
    """Every problem found in a configuration, reported at once."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        n = len(self.problems)
        head = f"invalid configuration ({n} problem{'s' if n != 1 else ''}):"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    if len(str(word)) > 200:  # no name is that long; do not diff a pasted megabyte
        return ""
    matches = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


def one_of(value: object, choices: Iterable[str]) -> str:
    choices = list(choices)
    return f"{preview(value)} is not one of {', '.join(choices)}{did_you_mean(str(value), choices)}"


def preview(value: Any, limit: int = PREVIEW_CHARS) -> str:
    """repr(value), cut to `limit` characters without ever rendering more than that."""
    out: list[str] = []
    budget = [limit + 1]

    def emit(text: str) -> None:
        text = text[:budget[0]]
        out.append(text)
        budget[0] -= len(text)

    def walk(item: Any, depth: int) -> None:
        if budget[0] <= 0:
            return
        if depth > 8:
            emit("...")
        elif isinstance(item, Mapping):
            emit("{")
            for i, (key, val) in enumerate(item.items()):
                if budget[0] <= 0:
                    return
                emit(", " if i else "")
                walk(key, depth + 1)
                emit(": ")
                walk(val, depth + 1)
            emit("}")
        elif isinstance(item, (list, tuple)):
            emit("[" if isinstance(item, list) else "(")
            for i, val in enumerate(item):
                if budget[0] <= 0:
                    return
                emit(", " if i else "")
                walk(val, depth + 1)
            emit("]" if isinstance(item, list) else ")")
        elif isinstance(item, str):
            emit(repr(item[:limit + 1]))
        elif isinstance(item, int) and not isinstance(item, bool) and item.bit_length() > 128:
            emit(f"<{item.bit_length()}-bit integer>")
        else:
            emit(repr(item)[:limit + 1])

    walk(value, 0)
    text = "".join(out)
    return text if len(text) <= limit else text[:limit - 3] + "..."
