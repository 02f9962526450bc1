"""Where documents come from: local text / JSON(L) / parquet files or folders, and URLs.

A source becomes a `SourcePlan`: streams of pieces `(text, ends_document, units)`, where
`units` (bytes read, or rows) drive the progress bar. A plain text file is one document,
cut into pieces only where the cut cannot change how a BPE tokenizer splits the text.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import LlmctlError

Piece = tuple[str, bool, float]  # (text, ends a document, progress units consumed)

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
STRUCTURED_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
PIECE_CHARS = 1 << 21  # ~2M characters per piece: big enough to amortise, small for memory
_READ_BYTES = 1 << 21
_MAX_PIECE_CHARS = 1 << 25  # a piece with no safe cut is cut hard beyond this


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


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https")


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


def text_file_pieces(path: Path, piece_chars: int = PIECE_CHARS) -> Iterator[Piece]:
    """The file as one document, in pieces cut at `safe_cut` points; units = bytes."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    buffer, consumed, offset = "", 0, 0
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
                    cut = (safe_cut(buffer, piece_chars) or safe_cut(buffer, len(buffer))
                           or (len(buffer) if len(buffer) > _MAX_PIECE_CHARS else 0))
                    if not cut:
                        break  # read on until a safe cut appears
                    yield buffer[:cut], False, consumed
                    buffer, consumed = buffer[cut:], 0
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
                from .hub import structured_file_pieces

                yield from structured_file_pieces(kind, paths, text_field,
                                                  unit_bytes=only_text)
    total = float(text_bytes) if only_text else None
    return SourcePlan(description or str(source), [
        Stream("all", source.name or str(source), pieces, total, "B" if only_text else "rows")],
        "tail")


# ---------------------------------------------------------------------------- downloads

_DOWNLOAD_HINT = ("download it yourself and pass --source PATH (a local copy); --source also "
                  "takes any local text / JSONL / parquet file or folder")


def download(url: str, cache_dir: Path, *, refresh: bool = False,
             what: str | None = None, progress: Callable[[int, int | None], None] | None = None
             ) -> Path:
    """Fetch `url` once into `cache_dir` (temp file + rename); later calls reuse it."""
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    key = hashlib.sha1(url.encode()).hexdigest()[:12]
    dest = cache_dir / f"{key}-{name}"
    if dest.is_file() and not refresh:
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    what = what or url
    hint = _DOWNLOAD_HINT
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=cache_dir)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "llmctl"})
        with urllib.request.urlopen(request, timeout=60) as response, os.fdopen(fd, "wb") as f:
            size = response.headers.get("Content-Length")
            size = int(size) if size and size.isdigit() else None
            done = 0
            while block := response.read(1 << 20):
                f.write(block)
                done += len(block)
                if progress:
                    progress(done, size)
        os.replace(tmp, dest)
    except urllib.error.HTTPError as err:
        raise LlmctlError(f"could not download {what} from {url}: HTTP {err.code} "
                          f"{err.reason}; {hint}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise LlmctlError(f"could not reach {url} to download {what} ({reason}); {hint}"
                          ) from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def probe_url(url: str, cache_dir: Path, what: str | None = None) -> None:
    """Raise the error `download` would, without downloading (a HEAD request)."""
    key = hashlib.sha1(url.encode()).hexdigest()[:12]
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    if (cache_dir / f"{key}-{name}").is_file():
        return
    try:
        request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "llmctl"})
        with urllib.request.urlopen(request, timeout=30):
            pass
    except urllib.error.HTTPError as err:
        if err.code not in (405, 501):  # HEAD not allowed: the download will tell
            raise LlmctlError(f"could not download {what or url} from {url}: HTTP {err.code} "
                              f"{err.reason}; {_DOWNLOAD_HINT}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise LlmctlError(f"could not reach {url} to download {what or url} ({reason}); "
                          f"{_DOWNLOAD_HINT}") from None


def url_plan(url: str, cache_dir: Path, text_field: str, refresh: bool,
             what: str | None = None) -> SourcePlan:
    path = download(url, cache_dir, refresh=refresh, what=what)
    if path.stat().st_size == 0:
        raise LlmctlError(f"{url} returned an empty file")
    return local_plan(path, text_field, description=url)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
