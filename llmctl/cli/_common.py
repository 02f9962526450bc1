"""What every command shares: turning bad-input errors into a message and an exit code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

from ..errors import LlmctlError


@contextmanager
def user_errors() -> Iterator[None]:
    """Print LlmctlError (config problems, bad paths, bad checkpoints) and exit with its code."""
    try:
        yield
    except LlmctlError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None


def not_implemented(command: str) -> None:
    typer.echo(f"llmctl {command}: not implemented yet", err=True)
    raise typer.Exit(1)
