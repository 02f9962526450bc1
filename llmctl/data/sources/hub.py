"""Hugging Face Hub datasets (the registry's tinystories, wikitext, fineweb).

They load through `datasets.load_dataset` (streaming for fineweb); `--source DIR` points the
very same code at a local copy (a folder of parquet / JSON files named by split, as the hub
stores them), which is also how the tests exercise it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ...core.errors import LlmctlError, one_of
from ..registry import HUB_DATASETS
from .base import STRUCTURED_SUFFIXES, Piece, SourcePlan, Stream
from .structured import _documents, _first_line, _load, _text_rows

VAL_SPLITS = ("validation", "val", "valid", "test")


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

# how a dataset's rows become documents (registry name -> function); default: a row each
ROW_GROUPING = {"wikitext_articles": wikitext_articles}


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
                yield from _documents(rows, ROW_GROUPING.get(spec.group_rows or ""))
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
