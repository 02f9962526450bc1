"""llmctl chat: a multi-turn conversation with a chat-tuned checkpoint (TTY or piped stdin)."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import typer

from ..core.errors import LlmctlError
from ..core.files import PROMPT_LIMIT, bounded_lines
from ._common import (
    checkpoint_argument,
    device_option,
    dtype_option,
    model_path_option,
    user_errors,
)

if TYPE_CHECKING:
    from ..infer.chat import ChatSession

_SAMPLING = "Sampling"


def chat(
    ckpt: Path | None = checkpoint_argument(),
    model_path: Path | None = model_path_option(),
    system: str | None = typer.Option(
        None, "--system", show_default=False,
        help="A system message opening the conversation (if the chat data had them)."),
    max_new_tokens: int = typer.Option(
        200, "--max_new_tokens", min=1, rich_help_panel=_SAMPLING,
        help="Most tokens per reply (a reply stops earlier at <|endofturn|>)."),
    temperature: float = typer.Option(
        0.7, "--temperature", "-t", min=0.0, rich_help_panel=_SAMPLING,
        help="Softmax temperature; 0 = greedy (argmax)."),
    top_k: int = typer.Option(200, "--top_k", min=0, rich_help_panel=_SAMPLING,
                              help="Sample among the k most likely tokens only (0 = off)."),
    top_p: float | None = typer.Option(
        None, "--top_p", min=0.0, max=1.0, show_default=False, rich_help_panel=_SAMPLING,
        help="Nucleus sampling: the smallest set of tokens holding probability p."),
    seed: int | None = typer.Option(None, "--seed", show_default=False,
                                    rich_help_panel=_SAMPLING,
                                    help="Random seed (same seed, same replies)."),
    device: str = device_option(),
    dtype: str = dtype_option(),
) -> None:
    """Chat with a checkpoint. One user turn per line; /reset starts over, /exit (or end of
    input) quits. Piped stdin works too: `printf 'Hello!\\nBye\\n' | llmctl chat CKPT`."""
    from ..infer.chat import ChatSession
    from ..infer.load import checkpoint_argument, load_checkpoint
    from ..infer.sample import SampleSettings

    with user_errors():
        path = checkpoint_argument(ckpt, model_path)
        settings = SampleSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k or None, top_p=top_p, seed=seed)
        settings.check()
        session = ChatSession(load_checkpoint(path, device=device, dtype=dtype), settings,
                              system=system)
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(f"chatting with {session.loaded.info.path} (block_size "
                   f"{session.loaded.block_size}, seed {settings.seed}); /reset, /exit",
                   err=True)
    out = sys.stdout
    with user_errors():
        for number, line in _turns(interactive):
            text = line.strip()
            if text == "/exit":
                break
            if not text:
                continue
            if text == "/reset":
                session.reset()
                typer.echo("(conversation reset)", err=True)
                continue
            try:
                _check_text(text)
                session.check_turn(text)
            except LlmctlError as err:
                if not interactive:  # piped input is a script: stop at its bad line
                    raise LlmctlError(f"stdin line {number}: {err}") from None
                typer.echo(f"error: {err} (not sent; type another message)", err=True)
                continue
            _answer(session, text, echo=not interactive, out=out)


def _answer(session: ChatSession, text: str, *, echo: bool, out: TextIO) -> None:
    if echo:
        out.write(f"user: {text}\n")
    out.write("assistant: ")
    out.flush()

    def emit(piece: str) -> None:
        out.write(piece)
        out.flush()

    before = session.cropped_turns
    session.reply(text, on_text=emit)
    out.write("\n")
    out.flush()
    if session.cropped_turns > before:
        typer.echo(f"(dropped the {session.cropped_turns - before} oldest message(s) to fit "
                   f"block_size {session.loaded.block_size})", err=True)


def _check_text(text: str) -> None:
    if len(text) > PROMPT_LIMIT:  # a terminal line; piped ones are bounded while read
        raise LlmctlError(f"the message is longer than {PROMPT_LIMIT:,} characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes kept as surrogates (POSIX locale)
        raise LlmctlError("the message is not UTF-8 text") from None


def _turns(interactive: bool) -> Iterator[tuple[int, str]]:
    """(line number, line) of each user turn until end of input. Piped lines are read with
    the prompt bound, so one endless line is never held whole."""
    if interactive:
        for number in itertools.count(1):
            try:
                line = input("user: ")
            except EOFError:
                return
            except UnicodeDecodeError:
                typer.echo("error: the message is not UTF-8 text (type another)", err=True)
                continue
            yield number, line
    lines = bounded_lines(sys.stdin, PROMPT_LIMIT)
    for number in itertools.count(1):
        try:
            line = next(lines, "")
        except UnicodeDecodeError:
            raise LlmctlError(f"stdin line {number} is not UTF-8 text") from None
        if line is None:
            raise LlmctlError(f"stdin line {number} is longer than {PROMPT_LIMIT:,} characters, "
                              "the limit for a chat message")
        if not line:
            return
        yield number, line
