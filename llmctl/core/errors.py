"""Errors that mean "bad input": the CLI prints them without a traceback and exits non-zero."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


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
    matches = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


def one_of(value: object, choices: Iterable[str]) -> str:
    choices = list(choices)
    return f"{value!r} is not one of {', '.join(choices)}{did_you_mean(str(value), choices)}"
