"""What every source produces: a `SourcePlan` of streams of pieces.

A piece is `(text, ends_document, units)`, where `units` (bytes read, or rows) drive the
progress bar.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

Piece = tuple[str, bool, float]  # (text, ends a document, progress units consumed)

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
STRUCTURED_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
PIECE_CHARS = 1 << 21  # ~2M characters per piece: big enough to amortise, small for memory


@dataclass
class Stream:
    """One pass over documents; `split` is train / val, or `all` to be divided later."""

    split: str
    label: str
    pieces: Callable[[], Iterator[Piece]]
    total: float | None  # units in the whole stream, when known
    unit: str  # "B" or "rows"


@dataclass
class SourcePlan:
    description: str  # recorded as meta.json "source"
    streams: list[Stream]
    split_policy: str  # "own": streams carry train/val; "tail": last fraction of tokens;
    #                    "heldout": a seeded fraction of documents
