"""Local files and folders: plain text cut at BPE-safe points, JSON(L) / parquet by rows.

A plain text file is one document, cut into pieces only where the cut cannot change how a
BPE tokenizer splits the text.
"""

from __future__ import annotations

import codecs
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from ...core.errors import LlmctlError
from ...core.files import file_kind
from .base import PIECE_CHARS, STRUCTURED_SUFFIXES, TEXT_SUFFIXES, Piece, SourcePlan, Stream
from .structured import structured_file_pieces

_READ_BYTES = 1 << 21
_MAX_PIECE_CHARS = 1 << 25  # a piece with no safe cut is cut hard beyond this


# ---------------------------------------------------------------------------- text files


# Cut points where every BPE split pattern (GPT-2's, cl100k's, o200k's) restarts the same
# way: after a newline between a non-space and a letter/digit, or before a single space
# between two letters (the space joins the next word). No pattern lets a piece cross them,
# and none looks behind, so the pieces on either side come out as in the whole text.
_CUT = re.compile(r"(?<=\S\n)(?=[^\W_])|(?<=[^\W\d_])(?= [^\W\d_])")
_CUT_WINDOW = 4096


def safe_cut(text: str, end: int) -> int:
    """The last safe cut point in 0 < p <= end (0 when there is none)."""
    stop = min(len(text) - 1, end)
    for start in (max(0, stop - _CUT_WINDOW), 0):
        last = 0
        for match in _CUT.finditer(text, start, stop + 1):
            if 0 < match.start() <= stop:
                last = match.start()
        if last or start == 0:
            return last
    return 0


def _first_cut(text: str, start: int) -> int:
    """The first safe cut point p >= start (0 when there is none yet)."""
    match = _CUT.search(text, max(1, start))
    return match.start() if match else 0


# A cut point needs two characters on each side: the last ones may still become one.
_CUT_CONTEXT = 2


def text_file_pieces(path: Path, piece_chars: int = PIECE_CHARS) -> Iterator[Piece]:
    """The file as one document, in pieces cut at `safe_cut` points; units = bytes.

    Linear in the file's length even without cut points (one long line): text already
    searched is never searched again (`scanned`)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    buffer, consumed, offset = "", 0, 0
    scanned = 0  # buffer[:scanned] is known to hold no cut point beyond piece_chars
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.read(_READ_BYTES)
                try:
                    buffer += decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as err:
                    raise LlmctlError(f"{path} is not UTF-8 text (bad byte at offset "
                                      f"{offset + err.start}); convert it to UTF-8") from None
                offset += len(raw)
                consumed += len(raw)
                while len(buffer) > piece_chars:
                    # The last safe cut within piece_chars, else the first one beyond it.
                    cut = (0 if scanned else safe_cut(buffer, piece_chars)) or _first_cut(
                        buffer, max(piece_chars, scanned - _CUT_CONTEXT))
                    if not cut and len(buffer) > _MAX_PIECE_CHARS:
                        cut = len(buffer)
                    if not cut:
                        scanned = len(buffer)  # read on until a safe cut appears
                        break
                    yield buffer[:cut], False, consumed
                    buffer, consumed, scanned = buffer[cut:], 0, 0
                if not raw:
                    break
    except OSError as err:
        raise LlmctlError(f"cannot read {path}: {err.strerror or err}") from None
    yield buffer, True, consumed


def _files_in(folder: Path) -> list[Path]:
    suffixes = set(TEXT_SUFFIXES) | set(STRUCTURED_SUFFIXES)
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in suffixes
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise LlmctlError(f"{folder} has no text ({', '.join(TEXT_SUFFIXES)}), JSON(L) or "
                          "parquet files")
    return files


def _kind(path: Path) -> str:
    return STRUCTURED_SUFFIXES.get(path.suffix.lower(), "text")


def local_plan(source: Path, text_field: str, description: str | None = None) -> SourcePlan:
    """A local file or folder as one stream, divided into train/val by the tail policy."""
    if not source.exists():
        raise LlmctlError(f"source {source} does not exist")
    mode = os.stat(source).st_mode
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):  # /dev/zero never ends; a FIFO blocks
        raise LlmctlError(f"source {source} is {file_kind(mode)}, not a regular file or a "
                          "folder")
    files = _files_in(source) if source.is_dir() else [source]
    groups: list[tuple[str, list[Path]]] = []  # consecutive files of one kind, in order
    for path in files:
        kind = _kind(path)
        if groups and groups[-1][0] == kind:
            groups[-1][1].append(path)
        else:
            groups.append((kind, [path]))
    text_bytes = sum(p.stat().st_size for p in files if _kind(p) == "text")
    only_text = all(kind == "text" for kind, _ in groups)

    def pieces() -> Iterator[Piece]:
        for kind, paths in groups:
            if kind == "text":
                for path in paths:
                    yield from text_file_pieces(path)
            else:
                yield from structured_file_pieces(kind, paths, text_field,
                                                  unit_bytes=only_text)
    total = float(text_bytes) if only_text else None
    return SourcePlan(description or str(source), [
        Stream("all", source.name or str(source), pieces, total, "B" if only_text else "rows")],
        "tail")
