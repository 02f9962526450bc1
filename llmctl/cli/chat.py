"""llmctl chat: a multi-turn conversation with a chat-tuned checkpoint (TTY or piped stdin)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ._common import (
    checkpoint_argument,
    device_option,
    dtype_option,
    model_path_option,
    user_errors,
)

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
    while True:
        line = _read_turn(interactive)
        if line is None or line.strip() == "/exit":
            break
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            session.reset()
            typer.echo("(conversation reset)", err=True)
            continue
        if not interactive:
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


def _read_turn(interactive: bool) -> str | None:
    if interactive:
        try:
            return input("user: ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line if line else None
