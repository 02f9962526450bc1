"""Every config parameter as a CLI flag.

Flags are declared in the reference's spelling (`--n_layer`, `--aux_free/--no_aux_free`); the
app's `token_normalize_func` (see `normalize_option`) maps dashes to underscores, so `--n-layer`
and `--no-aux-free` work too without doubling every row of `--help`.

`with_config_options` adds them to a Typer command; the command receives `config_files`
(from `--config`, repeatable) and `overrides` (only the flags the user actually typed),
which it hands to `load_config`.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from ..config.coerce import field_types
from ..config.schema import (
    ATTN_KINDS,
    BLOCK_FIELDS,
    DTYPES,
    MODEL_FIELDS,
    NORMS,
    POS_EMBS,
    TRAIN_FIELDS,
    BlockConfig,
    LLMConfig,
    TrainConfig,
)

_CHOICES = {"attn": ATTN_KINDS, "pos_emb": POS_EMBS, "norm": NORMS, "dtype": DTYPES}
_EXTRA = {
    "total_batch_size_str": ("Training", "TEXT",
                             "total_batch_size as an arithmetic expression, e.g. '2**11'."),
    "layer_configs": ("Layers", "JSON", "Per-layer configs as a JSON list of dicts (one of "
                      "this or --layer_configs_jsonl)."),
    "layer_configs_jsonl": ("Layers", "PATH", "JSONL file with one layer config per line."),
}


def _spec() -> list[tuple[str, Any, str, str]]:
    """(name, python type, panel, help) for every flag."""
    types = {**field_types(LLMConfig), **field_types(BlockConfig), **field_types(TrainConfig)}
    out = []
    for fields in (MODEL_FIELDS, BLOCK_FIELDS, TRAIN_FIELDS):
        for name, f in fields.items():
            out.append((name, types[name], f.metadata["panel"], f.metadata["help"]))
    for name, (panel, _, help_text) in _EXTRA.items():
        out.append((name, str, panel, help_text))
    return out


CONFIG_FLAGS = [name for name, *_ in _spec()]


def _metavar(name: str, annotation: Any) -> str:
    if name in _CHOICES:
        return "[" + "|".join(_CHOICES[name]) + "]"
    if name in _EXTRA:
        return _EXTRA[name][1]
    base = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return {int: "INT", float: "FLOAT"}.get(base[0], "TEXT")


def _is_bool(annotation: Any) -> bool:
    """bool, or `bool | None` (unset = an automatic choice, e.g. compile)."""
    return annotation is bool or (typing.get_origin(annotation) is not None
                                  and set(typing.get_args(annotation)) == {bool, type(None)})


def normalize_option(name: str) -> str:
    """Click calls this on option names (without the leading dashes), typed and declared."""
    return name.replace("-", "_")


def _param(name: str, annotation: Any, panel: str, help_text: str) -> inspect.Parameter:
    if _is_bool(annotation):
        option = typer.Option(None, f"--{name}/--no_{name}", help=help_text,
                              rich_help_panel=panel, show_default=False)
        kind = bool | None
    else:
        option = typer.Option(None, f"--{name}", help=help_text, rich_help_panel=panel,
                              metavar=_metavar(name, annotation), show_default=False)
        kind = str | None  # the loader coerces, so every source gives the same messages
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                             annotation=kind)


def _config_file_param() -> inspect.Parameter:
    option = typer.Option(None, "--config", "-c", help="Config file (YAML, JSON or JSONL); "
                          "repeat to layer several, later ones win.", rich_help_panel="Config")
    return inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=option,
                             annotation=list[Path] | None)


def with_config_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a command taking `config_files` and `overrides` with every config flag."""
    own = [p for p in inspect.signature(func).parameters.values()
           if p.name not in ("config_files", "overrides")]
    params = own + [_config_file_param()] + [_param(*spec) for spec in _spec()]

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        files = kwargs.pop("config") or []
        overrides = {}
        for name in CONFIG_FLAGS:
            value = kwargs.pop(name, None)
            if value is not None:
                overrides[name] = value
        return func(config_files=list(files), overrides=overrides, **kwargs)

    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    del wrapper.__wrapped__  # Typer must see the new signature, not the original one
    return wrapper
