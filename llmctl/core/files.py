"""Files in and out: bounded reads of files a user names, atomic writes of ours.

Reading: `read_user_file` is the one reader for user-named files (configs, layer files,
prompts, eval text, JSON inside checkpoints). It refuses what is not a regular file (a
device such as /dev/zero, a FIFO, a socket, a folder; symlinks are followed first), never
blocks on open, reads at most `limit` bytes (st_size is not trusted) and names the file and
the reason. Writing: the data goes to a temporary beside the target (same filesystem, so the
rename is atomic), is flushed and fsynced, then renamed into place, and the parent folder is
fsynced so the rename itself survives a crash. Only a regular file is written over (through
a symlink, its target, so the link stays); a FIFO, device, socket or folder there is refused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import LlmctlError
from .units import human_bytes

# Documented limits of what `read_user_file` reads, per kind of file.
CONFIG_FILE_LIMIT = 16 << 20  # YAML / JSON config files and JSONL layer files
PROMPT_LIMIT = 16 << 20  # sample --prompt_file / stdin: far beyond any block_size
EVAL_TEXT_LIMIT = 256 << 20  # eval --text: held whole; larger corpora go through prepare
CHECKPOINT_JSON_LIMIT = 64 << 20  # config.json / trainer_state.json in a checkpoint
DATASET_META_LIMIT = 64 << 20  # meta.json of a prepared dataset (a char vocabulary at most)
JSONL_RECORD_LIMIT = 16 << 20  # one line of a JSONL file read record by record (metrics, chat rows)
_CHUNK = 1 << 20


class UserFileError(LlmctlError):
    """A user-named file that cannot be read: `label` names it, `reason` says why."""

    def __init__(self, label: str, reason: str):
        self.label, self.reason = label, reason
        super().__init__(f"{label} {reason}")


def file_kind(mode: int) -> str:
    """What an st_mode names, for messages: 'a folder', 'a character device', ..."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def _read_bounded(f: IO[Any], limit: int) -> bytes | str | None:
    """At most `limit` bytes of `f` (characters, for a text stream), or None when there are
    more."""
    parts, size = [], 0
    while size <= limit:
        chunk = f.read(min(_CHUNK, limit + 1 - size))
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    if size > limit:
        return None
    return "".join(parts) if parts and isinstance(parts[0], str) else b"".join(parts)


def bounded_lines(f: IO[str], limit: int) -> Iterator[str | None]:
    """The lines of a text stream, each of at most `limit` characters (its newline aside); a
    longer one is read past in chunks, never held whole, and given as None."""
    while line := f.readline(limit + 1):
        if len(line) <= limit or line.endswith("\n"):
            yield line
            continue
        while (rest := f.readline(_CHUNK)) and not rest.endswith("\n"):
            pass
        yield None


def read_user_file(path: str | os.PathLike, what: str, limit: int, *,
                   allow_stdin: bool = False, text: bool = True,
                   stdin: IO[Any] | None = None) -> str | bytes:
    """The contents of a file the user named (`what` says which, e.g. "prompt file"):
    UTF-8 text (a leading BOM dropped) or, with text=False, bytes.

    Only regular files are read (symlinks followed); with `allow_stdin`, "-" reads standard
    input, with the same bound. Anything else is an LlmctlError naming the file and why.
    """
    name = str(path)
    if allow_stdin and name == "-":
        stream = stdin if stdin is not None else sys.stdin
        data = _read_bounded(getattr(stream, "buffer", stream), limit)
        label = f"{what} on stdin"
    else:
        label = f"{what} {name}"
        try:
            info = os.stat(name)
        except FileNotFoundError:
            raise UserFileError(label, "does not exist") from None
        except OSError as err:
            raise UserFileError(label, f"cannot be read: {err.strerror or err}") from None
        if not stat.S_ISREG(info.st_mode):
            raise UserFileError(label, f"is {file_kind(info.st_mode)}, not a regular file")
        try:
            # O_NONBLOCK: should the name turn into a FIFO after the stat, open still returns
            fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
                         | getattr(os, "O_NOCTTY", 0))
        except OSError as err:
            raise UserFileError(label, f"cannot be read: {err.strerror or err}") from None
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise UserFileError(label, f"is {file_kind(mode)}, not a regular file")
            try:
                data = _read_bounded(f, limit)
            except OSError as err:
                raise UserFileError(label, f"cannot be read: {err.strerror or err}") from None
    if data is None:
        raise UserFileError(label, f"is larger than {human_bytes(limit)}, the limit for a {what}")
    if not text or isinstance(data, str):  # a text stream (a test's StringIO) is decoded
        return data
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserFileError(label, f"is not UTF-8 text (bad byte at offset {err.start})") from None


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


def output_target(path: str | os.PathLike) -> Path:
    """Where a write to `path` lands: `path`, or the file a symlink there leads to (written
    in place of the link would lose it). A UserFileError when that is not a regular file (or
    absent): renaming over a FIFO or a device would silently replace it."""
    given = Path(path)
    target = Path(os.path.realpath(given)) if given.is_symlink() else given
    label = str(given) if target == given else f"{given} (a link to {target})"
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    except OSError as err:
        raise UserFileError(label, f"cannot be written: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        raise UserFileError(label, f"is {file_kind(mode)}, not a regular file: refusing to "
                                   "write over it")
    return target


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer that wants a file name (savefig,
    a download); on success it is fsynced and renamed to `path`, on failure removed. What is
    at `path` is checked first (`output_target`), before the writer spends any work."""
    final = output_target(path)
    tmp = temp_beside(final)
    try:
        yield tmp
        fsync_file(tmp)
        output_target(final)  # again: something may have been put there meanwhile
        with contextlib.suppress(FileNotFoundError):  # a rewrite keeps the file's mode (+x)
            os.chmod(tmp, stat.S_IMODE(os.stat(final).st_mode))
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


def open_regular(path: str | os.PathLike, flags: int, what: str, mode: int = 0o644, *,
                 follow_links: bool = False) -> int:
    """A descriptor of `path` (os.open `flags`; O_CREAT creates it) that is a regular file:
    never through a symlink unless `follow_links` (a planted one would aim a lock's writes
    elsewhere), never blocking (a FIFO), never a device. Not one: a UserFileError; other
    OSErrors pass through."""
    label = f"{what} {path}"
    with contextlib.suppress(FileNotFoundError):  # stat first: opening a device can act
        kind = (os.stat if follow_links else os.lstat)(path).st_mode
        if not stat.S_ISREG(kind):
            raise UserFileError(label, f"is {file_kind(kind)}, not a regular file")
    extra = (getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
             | getattr(os, "O_CLOEXEC", 0) | (0 if follow_links else getattr(os, "O_NOFOLLOW", 0)))
    try:
        fd = os.open(path, flags | extra, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink put there after the lstat
            raise UserFileError(label, "is a symbolic link, not a regular file") from None
        raise
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
        os.close(fd)
        raise UserFileError(label, f"is {file_kind(kind)}, not a regular file")
    return fd


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename `src` (a file or a folder) to `dst`, replacing a file there, and make the
    rename durable: every rename outside the writers above goes through here."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def swap_folder(new: Path, final: Path, old: Path) -> None:
    """Put the finished folder `new` in place of `final`, keeping the previous `final` as
    `old` between the two renames (the caller removes `old` afterwards). A crash between
    the renames leaves `old` whole, and `final` absent."""
    fsync_dir(new)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    fsync_dir(final.parent)
