"""The run folder (out_dir/file_name): where it is, that it is writable, that one process
writes it at a time, and that a fresh run does not mix with an earlier one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ..config import RunConfig
from ..core.errors import LlmctlError
from ..core.files import UserFileError, move, open_regular, output_target
from ..runtime.checkpoint import has_checkpoint
from .metrics import METRICS_FILE
from .plot import PLOT_FILE

LATEST, BEST = "latest", "best"
LOCK_FILE = ".lock"  # holds the pid of the `llmctl train` that writes the folder


def run_dir(run: RunConfig) -> Path:
    return Path(run.train.out_dir).expanduser() / run.train.file_name


def prepare_run_dir(path: Path) -> Path:
    """Create the run folder and prove it is writable, and that what the run appends to or
    writes over there is a regular file (before any training time is spent)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        blocker = _file_in_the_way(path)
        if blocker is not None:
            reason = f"{blocker} is a file, not a folder"
        raise LlmctlError(f"cannot write to the run folder {path}: {reason} (choose another "
                          "--out_dir)") from None
    for name in (METRICS_FILE, PLOT_FILE):  # appending to a FIFO would block for ever
        try:
            output_target(path / name)
        except UserFileError as err:
            raise LlmctlError(f"cannot use the run folder {path}: {err}; remove it, or "
                              "choose another --file_name") from None
    return path


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing part of `path` when it is not a folder (None if all are)."""
    for part in [path, *path.parents]:
        if part.exists() or part.is_symlink():
            return None if part.is_dir() else part
    return None


def check_fresh_start(folder: Path, *, set_aside_metrics: bool) -> None:
    """Before a run that resumes nothing: refuse a folder holding an earlier run's
    checkpoints (mixing them would leave e.g. a stale best/ that sample and eval pick), and
    set an earlier metrics.jsonl aside rather than appending to it. Nothing is deleted."""
    earlier = [name for name in (LATEST, BEST) if has_checkpoint(folder / name)]
    if earlier:
        raise LlmctlError(
            f"the run folder {folder} already holds checkpoints of an earlier run "
            f"({', '.join(n + '/' for n in earlier)}): continue it with --resume auto, or start "
            "a new run under another --file_name (or --out_dir), or remove the folder")
    metrics = folder / "metrics.jsonl"
    if set_aside_metrics and metrics.is_file():
        stamp = int(metrics.stat().st_mtime)
        aside = folder / f"metrics.{stamp}.jsonl"
        n = 1
        while aside.exists():
            aside, n = folder / f"metrics.{stamp}-{n}.jsonl", n + 1
        move(metrics, aside)


class RunFolderLock:
    """An exclusive flock on `folder/.lock` for one training run; the OS drops it when the
    holder dies (even by SIGKILL), so a crashed run never leaves the folder locked.

    The file is never deleted (deleting it would let two runs lock two different files);
    its content is only the holder's pid, for the message a second run gets.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunFolderLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no locking
            return self
        try:
            fd = open_regular(self.path, os.O_RDWR | os.O_CREAT, "the lock file")
        except UserFileError as err:  # a planted symlink would get its target truncated
            raise LlmctlError(f"cannot lock the run folder {self.folder}: {err}; remove it "
                              "(llmctl train makes a new one), or choose another "
                              "--file_name") from None
        except OSError as err:
            raise LlmctlError(f"cannot create the lock file {self.path}: "
                              f"{err.strerror or err} (choose another --out_dir)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_pid(fd)
            os.close(fd)
            if isinstance(err, BlockingIOError):
                who = f"pid {holder}" if holder else "another process"
                raise LlmctlError(
                    f"the run folder {self.folder} is in use by another `llmctl train` ({who});"
                    " one run writes a run folder at a time: wait for it to finish, stop it "
                    "(Ctrl-C or kill -INT), or use another --file_name") from None
            raise LlmctlError(f"cannot lock {self.path}: {err.strerror or err}") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the lock holds without the pid; only the message gets vaguer
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None


def check_run_folder_free(folder: Path) -> None:
    """Refuse now (before a launch) if another run holds `folder`."""
    with RunFolderLock(folder):
        pass
