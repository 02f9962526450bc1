"""Hugging Face `datasets` sources: the hub datasets, and local JSON(L) / parquet files.

Hub datasets load through `datasets.load_dataset` (streaming for fineweb); `--source DIR`
points the very same code at a local copy (a folder of parquet / JSON files named by split,
as the hub stores them), which is also how the tests exercise it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import LlmctlError, one_of
from .sources import STRUCTURED_SUFFIXES, Piece, SourcePlan, Stream

_ROWS_PER_BATCH = 1000
VAL_SPLITS = ("validation", "val", "valid", "test")


@dataclass(frozen=True)
class HubDataset:
    name: str
    repo: str  # hub id
    subsets: tuple[str, ...]  # the first is the default
    streaming: bool
    has_val: bool
    group_rows: Callable[[Iterable[tuple[str, float]]], Iterator[Piece]] | None = None


def wikitext_articles(rows: Iterable[tuple[str, float]]) -> Iterator[Piece]:
    """Wikitext rows are lines; a document is an article, opened by a ` = Title = ` line."""
    article: list[str] = []
    units = 0.0
    for text, row_units in rows:
        if _WIKI_TITLE.match(text) and any(line.strip() for line in article):
            yield "".join(article), True, units
            article, units = [], 0.0
        article.append(text)
        units += row_units
    if any(line.strip() for line in article):
        yield "".join(article), True, units
    elif units:
        yield "", True, units


_WIKI_TITLE = re.compile(r"^ = [^=].* = \n?$")

HUB_DATASETS = {
    "tinystories": HubDataset("tinystories", "roneneldan/TinyStories", ("default",),
                              streaming=False, has_val=True),
    "wikitext": HubDataset("wikitext", "Salesforce/wikitext",
                           ("wikitext-103-raw-v1", "wikitext-2-raw-v1", "wikitext-103-v1",
                            "wikitext-2-v1"), streaming=False, has_val=True,
                           group_rows=wikitext_articles),
    "fineweb": HubDataset("fineweb", "HuggingFaceFW/fineweb-edu",
                          ("sample-10BT", "sample-100BT", "sample-350BT", "default"),
                          streaming=True, has_val=False),
}


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


def _split_total(dataset: Any, split: str) -> float | None:
    rows = getattr(dataset, "num_rows", None)
    if isinstance(rows, int):
        return float(rows)
    info = getattr(dataset, "info", None)
    splits = getattr(info, "splits", None) or {}
    entry = splits.get(split) if hasattr(splits, "get") else None
    return float(entry.num_examples) if entry is not None and entry.num_examples else None


def hub_plan(name: str, *, source: str | None, subset: str | None, text_field: str,
             streaming: bool | None, cache_dir: str | None) -> SourcePlan:
    """Streams of a hub dataset (or of its local copy at `source`)."""
    spec = HUB_DATASETS[name]
    subset = subset or spec.subsets[0]
    if subset not in spec.subsets:
        raise LlmctlError(f"--subset for {name}: {one_of(subset, spec.subsets)}")
    streaming = spec.streaming if streaming is None else streaming
    kwargs: dict[str, Any] = {"streaming": streaming}
    if cache_dir:
        kwargs["cache_dir"] = str(cache_dir)
    config = None if subset == "default" else subset
    if source is None:
        args: tuple = (spec.repo, config) if config else (spec.repo,)
        what = f"{spec.repo}{f' ({subset})' if config else ''} from the Hugging Face Hub"
        hint = (f"without network access, download it elsewhere (e.g. `hf download "
                f"{spec.repo} --repo-type dataset --local-dir DIR`), copy it here and pass "
                "--source DIR; --source also takes any local text / JSONL / parquet file or "
                "folder")
        description = f"hf://datasets/{spec.repo}{f'/{config}' if config else ''}"
    else:
        args, extra = _local_args(Path(source), config)
        kwargs.update(extra)
        description = str(source)
        what, hint = f"{source} with Hugging Face datasets", (
            "point --source at a folder of parquet / JSON(L) files named by split (train-*, "
            "validation-*) or at one such file")
    loaded = _load(args, kwargs, what, hint)
    splits = list(loaded.keys()) if hasattr(loaded, "keys") else []
    if "train" not in splits:
        raise LlmctlError(f"{description} has no train split (splits: {', '.join(splits)})")
    val = next((s for s in VAL_SPLITS if s in splits), None) if spec.has_val or source else None
    chosen = [("val", val), ("train", "train")] if val else [("all", "train")]
    streams = []
    for ours, theirs in chosen:
        dataset = loaded[theirs]
        origin = f"{description} [{theirs}]"

        def pieces(dataset: Any = dataset, origin: str = origin) -> Iterator[Piece]:
            rows = _text_rows(dataset, text_field, origin)
            try:
                yield from _documents(rows, spec.group_rows)
            except LlmctlError:
                raise
            except Exception as err:  # network drops / bad files surface while iterating
                raise LlmctlError(f"reading {origin} failed: {_first_line(err)}") from None
        streams.append(Stream(ours, theirs, pieces, _split_total(dataset, theirs), "rows"))
    return SourcePlan(description, streams, "own" if val else "heldout")


def _local_args(source: Path, config: str | None) -> tuple[tuple, dict[str, Any]]:
    """load_dataset's positional and extra keyword arguments for a local copy."""
    if not source.exists():
        raise LlmctlError(f"source {source} does not exist")
    if source.is_file():
        kind = STRUCTURED_SUFFIXES.get(source.suffix.lower())
        if kind is None:
            raise LlmctlError(f"{source}: a hub dataset's local copy must be parquet or "
                              "JSON(L) files (or a folder of them)")
        return (kind,), {"data_files": str(source)}
    if config and (source / config).is_dir():  # the hub's per-config subfolders
        return (str(source / config),), {}
    if config and (source / "README.md").is_file():  # a hub snapshot with its config table
        return (str(source), config), {}
    return (str(source),), {}
