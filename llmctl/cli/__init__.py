"""The `llmctl` command tree. Each command lives in its own thin module; torch loads lazily."""

from __future__ import annotations

import os
import sys

import typer

from .. import __version__
from .chat import chat
from .compare import compare
from .eval_cmd import eval_cmd
from .export import export
from .inspect_params import inspect_params
from .merge_lora import merge_lora
from .options import normalize_option
from .prepare import prepare
from .sample import sample
from .sweep import sweep
from .train import train
from .validate_config import validate_config

app = typer.Typer(
    name="llmctl",
    help="Build, train, evaluate and sample decoder-only language models from configuration. "
    "Every flag works with underscores or dashes (--n_layer / --n-layer).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # `--n-layer` and `--n_layer` are one flag: option names are normalized to underscores
    context_settings={"help_option_names": ["-h", "--help"],
                      "token_normalize_func": normalize_option},
)

app.command("prepare", help="Download and tokenize a dataset into memory-mapped token files.",
            )(prepare)
app.command("validate-config", help="Check YAML / JSON / JSONL configs and flags without "
            "training.")(validate_config)
app.command("train", help="Train a model (CPU, one GPU, or many through torchrun).")(train)
app.command("eval", help="Loss and perplexity of a checkpoint on a dataset split or text.")(
    eval_cmd)
app.command("sample", help="Generate text from a checkpoint.")(sample)
app.command("chat", help="Chat with a checkpoint fine-tuned on chat data (TTY or piped "
            "stdin).")(chat)
app.command("merge-lora", help="Fold a LoRA checkpoint's adapter into a plain checkpoint.")(
    merge_lora)
app.command("export", help="Write a checkpoint as a Hugging Face transformers folder.")(export)
app.command("inspect-params", help="Parameters (total / active), FLOPs, KV-cache and memory "
            "estimates.")(inspect_params)
app.command("sweep", help="Train a grid of configs (restartable), or write one command / a "
            "SLURM array for it.")(sweep)
app.command("compare", help="Loss curves of several runs in one figure, and a table of "
            "them.")(compare)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool | None = typer.Option(None, "--version", "-V", callback=_version,
                                           is_eager=True, help="Print the version and exit."),
) -> None:
    """Build, train, evaluate and sample decoder-only language models from configuration."""


def main() -> None:
    if sys.stdout is None:  # started with stdout closed (`>&-`): its output goes nowhere
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    try:
        app()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except OSError as err:
        if not _from_stdout(err):
            raise
        # stdout on a full disk or a dead device: say so once, and let the exit flush nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        typer.echo(f"error: cannot write to standard output: {err.strerror or err}", err=True)
        raise SystemExit(2) from None


def _from_stdout(err: OSError) -> bool:
    """Whether `err` was raised writing standard output (a frame on its way holds stdout)."""
    streams = (sys.stdout, getattr(sys.stdout, "buffer", None))
    tb = err.__traceback__
    while tb is not None:
        if any(value is stream for value in tb.tb_frame.f_locals.values() for stream in streams
               if stream is not None):
            return True
        tb = tb.tb_next
    return False
