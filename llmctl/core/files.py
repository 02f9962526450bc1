"""Atomic writes: a file or folder appears whole under its final name, or not at all.

Everything llmctl writes goes through here: the data goes to a temporary beside the target
(same filesystem, so the rename is atomic), is flushed and fsynced, then renamed into place,
and the parent folder is fsynced so the rename itself survives a crash.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def temp_beside(path: Path, tag: str = "tmp") -> Path:
    """A unique hidden name next to `path` (`.name.PID-RANDOM.tmp`)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.{tag}")


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where folders cannot be
    opened, e.g. on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer that wants a file name (savefig,
    a download); on success it is fsynced and renamed to `path`, on failure removed."""
    final = Path(path)
    tmp = temp_beside(final)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb",
                encoding: str | None = None) -> Iterator[IO[Any]]:
    """An open temporary file that becomes `path` when the block ends without error."""
    with atomic_path(path) as tmp, open(tmp, mode.replace("w", "x"), encoding=encoding) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def swap_folder(new: Path, final: Path, old: Path) -> None:
    """Put the finished folder `new` in place of `final`, keeping the previous `final` as
    `old` between the two renames (the caller removes `old` afterwards). A crash between
    the renames leaves `old` whole, and `final` absent."""
    fsync_dir(new)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    fsync_dir(final.parent)
