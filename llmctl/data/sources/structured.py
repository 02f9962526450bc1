"""Rows of JSON(L) / parquet data read through Hugging Face `datasets` (local files, and the
rows of hub datasets)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ...core.errors import LlmctlError
from .base import Piece

_ROWS_PER_BATCH = 1000


def _datasets() -> Any:
    import datasets

    return datasets


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def _load(args: tuple, kwargs: dict, what: str, hint: str) -> Any:
    try:
        return _datasets().load_dataset(*args, **kwargs)
    except (KeyboardInterrupt, SystemExit, LlmctlError):
        raise
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFound...)
        raise LlmctlError(f"could not load {what}: {_first_line(err)}; {hint}") from None


def _text_rows(dataset: Any, text_field: str, origin: str,
               unit_bytes: bool = False) -> Iterator[tuple[str, float]]:
    """(text, units) per row; rows without text are skipped (but still counted)."""
    columns = getattr(dataset, "column_names", None)
    if columns is not None and text_field not in columns:
        raise LlmctlError(f"{origin} has no field {text_field!r}; its fields are "
                          f"{', '.join(map(str, columns))} (choose one with --text_field)")
    if columns is not None and len(columns) > 1:
        dataset = dataset.select_columns([text_field])
    for batch in dataset.iter(batch_size=_ROWS_PER_BATCH):
        if text_field not in batch:
            raise LlmctlError(f"{origin} has no field {text_field!r}; its fields are "
                              f"{', '.join(map(str, batch))} (choose one with --text_field)")
        for text in batch[text_field]:
            if text is None:
                continue
            if not isinstance(text, str):
                raise LlmctlError(f"{origin}: field {text_field!r} holds "
                                  f"{type(text).__name__} values, not text")
            yield text, float(len(text.encode())) if unit_bytes else 1.0


def _documents(rows: Iterable[tuple[str, float]], group: Callable | None) -> Iterator[Piece]:
    if group is not None:
        yield from group(rows)
        return
    for text, units in rows:
        yield text, True, units


def structured_file_pieces(kind: str, paths: list[Path], text_field: str,
                           unit_bytes: bool = False) -> Iterator[Piece]:
    """Rows of local JSON(L) / parquet files, streamed through `datasets`."""
    files = [str(p) for p in paths]
    origin = paths[0] if len(paths) == 1 else f"{paths[0].parent} ({len(paths)} files)"
    dataset = _load((kind,), {"data_files": files, "split": "train", "streaming": True},
                    f"{origin}", f"check that it is valid {kind.upper()} with a "
                    f"{text_field!r} field")
    rows = _text_rows(dataset, text_field, str(origin), unit_bytes)
    try:
        yield from _documents(rows, None)
    except LlmctlError:
        raise
    except Exception as err:  # malformed rows surface while iterating
        raise LlmctlError(f"could not read {origin}: {_first_line(err)}") from None
