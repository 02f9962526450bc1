"""What every command shares: turning bad-input errors into a message and an exit code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from ..core.errors import LlmctlError


@contextmanager
def user_errors() -> Iterator[None]:
    """Print LlmctlError (config problems, bad paths, bad checkpoints) and exit with its code."""
    try:
        yield
    except LlmctlError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None


def checkpoint_argument() -> typer.models.ArgumentInfo:
    return typer.Argument(None, metavar="CKPT", show_default=False, help="Checkpoint folder, "
                          "or run folder (its best checkpoint, else latest).")


def model_path_option() -> typer.models.OptionInfo:
    return typer.Option(None, "--model_path", show_default=False,
                        help="The checkpoint, as the reference names it (instead of CKPT).")


def device_option() -> typer.models.OptionInfo:
    return typer.Option("auto", "--device",
                        help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.")


def dtype_option() -> typer.models.OptionInfo:
    return typer.Option("auto", "--dtype", help="auto (bf16/fp16 autocast on CUDA, fp32 "
                        "elsewhere), float32, bfloat16 or float16.")


def load_for_inference(path: str, device: str, dtype: str):
    """A checkpoint / run folder, or `hf:PATH` (a transformers folder, through interop)."""
    if path.startswith("hf:"):
        from ..interop.hf_import import load_hf_checkpoint

        return load_hf_checkpoint(path, device=device, dtype=dtype)
    from ..infer.load import load_checkpoint

    return load_checkpoint(path, device=device, dtype=dtype)


def with_hf_init(config_files: list, overrides: dict[str, Any],
                 scratch: Path | None = None) -> dict[str, Any]:
    """`init_from: hf:PATH` (a flag or a config file's key) imported as an llmctl checkpoint
    (into the run folder, or `scratch`: validate-config writes nothing there), and the flags
    pointing `init_from` at it; the flags as they are otherwise."""
    from ..config import load_config

    if not str(overrides.get("init_from") or "").startswith("hf:") and not config_files:
        return overrides
    probe = load_config(*config_files, overrides=overrides, check_batch_split=False)
    init_from = probe.train.init_from
    if not init_from or not init_from.startswith("hf:"):
        return overrides
    from ..interop.hf_init import resolve_hf_init
    from ..train.run_folder import run_dir

    return resolve_hf_init(init_from, scratch or run_dir(probe), overrides)
