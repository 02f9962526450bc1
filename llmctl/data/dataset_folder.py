"""A dataset's folder under DATA_DIR: one prepare per name at a time (a lock the OS releases
even on SIGKILL), whether a finished dataset with the same settings is there already, and
the swap of a finished partial folder into place (the old dataset goes only after)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.errors import LlmctlError
from ..core.files import open_regular, swap_folder
from . import layout
from .chat import MASK_SUFFIX, OFFSETS_SUFFIX

# what prepare writes into a dataset folder (anything else there is the user's: never replaced)
OUR_FILES = {"train.bin", "val.bin", "all.bin", layout.META_FILE, "tokenizer.tiktoken",
             *(s + suffix for s in layout.SPLITS for suffix in (MASK_SUFFIX, OFFSETS_SUFFIX)),
             "tokenizer.json"}


class DataDirNotWritable(LlmctlError):
    """The data_dir refuses new files (read-only filesystem, no permission, ...)."""


@contextlib.contextmanager
def lock(data_dir: Path, name: str) -> Iterator[None]:
    """One prepare per dataset name at a time (released by the OS even on SIGKILL)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking
        yield
        return
    path = data_dir / f".{name}.lock"
    busy = LlmctlError(f"another `llmctl prepare` is writing {data_dir / name} right now; "
                       "wait for it to finish")
    try:
        # never through a planted symlink, never blocking on a FIFO: a UserFileError
        f = os.fdopen(open_regular(path, os.O_RDWR | os.O_CREAT, "the lock file"), "a+")
    except OSError as err:
        raise DataDirNotWritable(f"cannot write to data_dir {data_dir}: "
                                 f"{err.strerror or err} (creating {path}); choose another "
                                 "--data_dir") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy from None
        try:  # the file may have been unlinked by the run that held it
            if os.stat(path).st_ino != os.fstat(f.fileno()).st_ino:
                raise busy
        except FileNotFoundError:
            raise busy from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
            fcntl.flock(f, fcntl.LOCK_UN)


def existing_dataset(final: Path, fingerprint: dict[str, Any],
                     force: bool) -> dict[str, Any] | None:
    """meta.json of a finished dataset with these settings; None when it must be (re)made."""
    if not final.exists():
        return None
    if not final.is_dir():
        raise LlmctlError(f"{final} exists and is not a folder; remove it or choose --name")
    others = sorted(p.name for p in final.iterdir() if p.name not in OUR_FILES)
    try:
        meta = layout.read_meta(final)
        layout.check_split_files(final, meta)
    except LlmctlError:  # an unfinished or damaged dataset: redone, if only ours is there
        meta = None
    if meta is None or force:
        if others:  # replacing the folder would delete them
            raise LlmctlError(f"{final} holds files that prepare did not write "
                              f"({', '.join(others[:5])}); move them or choose --name")
        return None
    old = meta.get("options", {})
    changed = [f"{key}: {old.get(key)!r} before, {value!r} now"
               for key, value in fingerprint.items() if old.get(key) != value]
    if changed:
        raise LlmctlError(f"{final} is already prepared with other settings ("
                          f"{'; '.join(changed)}); pass --force to replace it, or --name to "
                          "prepare a separate dataset")
    return meta


def install(partial: Path, final: Path) -> None:
    """Swap the finished partial folder into place (the old dataset goes only after)."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    swap_folder(partial, final, old)
    shutil.rmtree(old, ignore_errors=True)
