"""`--nproc N`: launch N data-parallel training processes on this machine through torchrun.

The launcher checks what it can before starting torchrun (config, dataset, run folder and
its lock, resume target, device), ties the process tree to its own life (each process dies
with its parent: torchrun with the launcher, workers with torchrun), and reports a worker's
clean error once, with its exit code, instead of every rank's copy plus torchrun's
`ChildFailedError` traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..core.errors import LlmctlError
from ..core.files import CHECKPOINT_JSON_LIMIT, read_user_file, write_json_atomic
from .resume import resolve_run_config

# Set by the launcher for its workers: its pid (workers exit if it is already gone) and the
# folder where a worker leaves its clean error for the launcher to report.
LAUNCHER_PID_ENV = "LLMCTL_LAUNCHER_PID"
ERROR_DIR_ENV = "LLMCTL_ERROR_DIR"

_PR_SET_PDEATHSIG = 1
# torchrun's own log lines ("E1201 12:00:00.000 123 torch/distributed/elastic/...") and its
# report of a failed worker: noise once a worker has said what went wrong.
_TORCHRUN_LOG = re.compile(r"^[EWI]\d{4} \d\d:\d\d:\d\d")
# a traceback, as Python prints it or as torch prefixes a worker's ("[rank0]: Traceback ...")
_TRACEBACK = re.compile(r"^(\[rank\d+\]:\s*)?Traceback \(most recent call last\):")


def torchrun_command(nproc: int, args: Sequence[str]) -> list[str]:
    """`torchrun --standalone --nproc_per_node N -m llmctl train ARGS` for this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "llmctl", "train", *args]


def _children(pid: int) -> list[int]:
    """Child process ids of `pid` (Linux /proc; [] where unavailable)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(child) for child in f.read().split()]
    except OSError:
        return []
    return found


# ------------------------------------------------------------------ dying with the parent


def _prctl() -> Callable[..., int] | None:
    """libc's prctl on Linux (None elsewhere: there the launcher's watch is all we have)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        return None


def _die_with_parent_hook(parent: int) -> Callable[[], None] | None:
    """A preexec_fn for torchrun: SIGKILL when the launcher dies (and at once if it is
    already gone). SIGKILL, not SIGTERM: torchrun's agent would turn a SIGTERM into a
    traceback; its workers die with it through their own death signal."""
    prctl = _prctl()
    if prctl is None:
        return None

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
    return hook


def die_with_parent() -> None:
    """Called first in a worker the launcher started: die with torchrun (the parent), and
    exit at once if the launcher is already gone (its death killed torchrun, but maybe just
    before this worker set its death signal)."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    prctl = _prctl()
    if not launcher or prctl is None:
        return
    if not launcher.isdigit() or not 0 < int(launcher) < 2**31:
        raise LlmctlError(f"{LAUNCHER_PID_ENV}={launcher[:40]!r} is not a process id (llmctl "
                          "train --nproc sets it for its workers; unset it)")
    parent = os.getppid()
    prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    try:
        os.kill(int(launcher), 0)
    except ProcessLookupError:
        os._exit(1)
    except PermissionError:  # pragma: no cover - alive, another user's pid
        pass
    if os.getppid() != parent:  # torchrun died between the two lines above
        os._exit(1)


# ------------------------------------------------------------------ errors from workers


def report_worker_error(rank: int, err: LlmctlError) -> bool:
    """In a launched worker: leave the clean error for the launcher (which prints it once);
    False when not launched by `--nproc` (or the note cannot be written): print it."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder:
        return False
    try:
        write_json_atomic(Path(folder) / f"rank{rank}.json",
                          {"rank": rank, "message": str(err), "exit_code": err.exit_code})
    except OSError:
        return False
    return True


def _worker_errors(folder: Path) -> list[dict[str, Any]]:
    found = []
    for path in folder.glob("rank*.json"):
        with contextlib.suppress(LlmctlError, ValueError):  # a worker's note: small, regular
            note = json.loads(read_user_file(path, "worker note", CHECKPOINT_JSON_LIMIT))
            if isinstance(note, dict) and isinstance(note.get("message"), str):
                found.append(note)
    return sorted(found, key=lambda note: note.get("rank", 0))


_ROOT_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
_ROOT_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+) \(pid: (\d+)\)")


def _explain_failure(held: list[str], code: int) -> tuple[list[str], str]:
    """For a failure no worker explained: (lines worth showing, one-line summary).

    torchrun's own ChildFailedError traceback is dropped, but its root cause (which rank,
    which pid, which exit code or signal) becomes the summary. A rank killed by a signal
    explains everything; the others' tracebacks (a peer's connection reset) are only its
    echo. A rank that exited with a code crashed in Python: its traceback stays.
    """
    cut = next((i for i, line in enumerate(held) if "ChildFailedError" in line), None)
    rank = exit_code = pid = None
    if cut is not None:
        start = max((i for i in range(cut) if _TRACEBACK.match(held[i])), default=cut)
        tail = held[cut:]
        root = next((i for i, line in enumerate(tail) if "Root Cause" in line), len(tail))
        for line in tail[root:]:
            if rank is None and (m := _ROOT_RANK.match(line)):
                rank = int(m.group(1))
            if exit_code is None and (m := _ROOT_EXIT.match(line)):
                exit_code, pid = int(m.group(1)), int(m.group(2))
        held = held[:start]
    after = ("torchrun stopped the other processes; the last saved checkpoint is intact "
             "(continue with --resume auto)")
    if rank is None or exit_code is None:
        return held, f"a training process failed (torchrun exit code {code}); {after}"
    if exit_code < 0:
        try:
            how = f"was killed by {signal.Signals(-exit_code).name}"
        except ValueError:
            how = f"was killed by signal {-exit_code}"
        worker_lines = []  # the survivors' errors only echo the death
    else:
        how = f"failed with exit code {exit_code} (its output is above)"
        worker_lines = [line for line in held if not _TORCHRUN_LOG.match(line)]
    return worker_lines, f"rank {rank} (pid {pid}) {how}; {after}"


def _format_errors(notes: list[dict[str, Any]]) -> str:
    """Each distinct message once; a rank's name only where ranks disagree."""
    distinct = list(dict.fromkeys(note["message"] for note in notes))
    if len(distinct) == 1:
        return f"error: {distinct[0]}"
    seen: set[str] = set()
    lines = []
    for note in notes:
        if note["message"] not in seen:
            seen.add(note["message"])
            lines.append(f"rank {note.get('rank', '?')}: error: {note['message']}")
    return "\n".join(lines)


class _StderrFilter:
    """Streams torchrun's stderr (and its workers') through, but holds back torchrun's own
    log lines and anything from a traceback on: shown at the end only when no worker left
    a clean error (then they are the only clue)."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.held: list[str] = []
        self._holding = False
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for raw in iter(self.stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            if _TRACEBACK.match(line):
                self._holding = True
            if self._holding or _TORCHRUN_LOG.match(line):
                self.held.append(line)
            else:
                sys.stderr.write(line)
                sys.stderr.flush()
        self.stream.close()

    def finish(self) -> None:
        self._thread.join(timeout=10)


# ------------------------------------------------------------------ the launcher


def launch(nproc: int, args: Sequence[str]) -> int:
    """Run the training job under torchrun and return its exit code.

    torchrun runs in its own session, so a Ctrl-C at the terminal reaches only us; we pass
    SIGINT / SIGTERM straight to the workers, which finish their step, save `latest` and
    exit cleanly (torchrun itself would turn the signal into a failure and a traceback).
    A worker's death makes torchrun stop the others (its default); our death kills torchrun
    and, through it, the workers.
    """
    if os.environ.get("WORLD_SIZE") not in (None, "1"):
        raise LlmctlError("--nproc cannot be used inside a torchrun job")
    with tempfile.TemporaryDirectory(prefix="llmctl-errors-") as errors:
        env = {**os.environ, LAUNCHER_PID_ENV: str(os.getpid()), ERROR_DIR_ENV: errors}
        proc = subprocess.Popen(torchrun_command(nproc, args), start_new_session=True,
                                env=env, stderr=subprocess.PIPE,
                                preexec_fn=_die_with_parent_hook(os.getpid()))
        stderr = _StderrFilter(proc.stderr)

        def forward(signum: int, frame: object) -> None:
            workers = _children(proc.pid)
            for pid in workers or [proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        notes = _worker_errors(Path(errors))
        stderr.finish()
    if notes:  # the workers said what went wrong: nothing else is worth showing
        sys.stderr.write(_format_errors(notes) + "\n")
        return int(notes[0].get("exit_code") or 2)
    if code:
        shown, summary = _explain_failure(stderr.held, code)
        sys.stderr.write("".join(shown) + f"error: {summary}\n")
    else:
        sys.stderr.write("".join(stderr.held))
    return code


def preflight(run: Any, nproc: int) -> None:
    """What every rank would check first, checked once here before any process starts:
    device, dataset, run folder (writable, not locked by another run) and resume target."""
    from ..runtime.device import Precision
    from ..runtime.distributed import DistEnv
    from .data import open_training_data
    from .resume import check_same_architecture, read_resume_checkpoint, resume_target
    from .run_folder import check_fresh_start, check_run_folder_free, prepare_run_dir, run_dir

    cfg = run.train
    try:
        device = Precision.from_names(cfg.device, cfg.dtype, 0).device
    except (RuntimeError, ValueError) as err:
        raise LlmctlError(f"--device {cfg.device}: {err}") from None
    if device.type == "cuda" and cfg.device in ("auto", "cuda"):  # rank i takes cuda:i
        import torch

        if nproc > torch.cuda.device_count():
            raise LlmctlError(f"--nproc {nproc} needs {nproc} CUDA devices (one per process) "
                              f"but {torch.cuda.device_count()} are visible; use --nproc "
                              f"{torch.cuda.device_count()}")
    open_training_data(run, DistEnv(rank=0, local_rank=0, world_size=nproc))
    folder = prepare_run_dir(run_dir(run))
    check_run_folder_free(folder)
    ckpt = resume_target(cfg.resume, folder)
    if ckpt is None:
        check_fresh_start(folder, set_aside_metrics=False)
    else:
        check_same_architecture(read_resume_checkpoint(ckpt), run.model)


def launch_training(nproc: int, config_files: list[Path], overrides: dict[str, Any]) -> int:
    """`llmctl train --nproc N ...`: check the config, data and run folder once here, then
    run the same command line in N torchrun workers; returns the exit code."""
    run = resolve_run_config(config_files, overrides, world_size=nproc)
    preflight(run, nproc)  # fail before spawning
    args: list[str] = []
    for path in config_files:
        args += ["--config", str(path)]
    for key, value in overrides.items():
        if isinstance(value, bool):
            args.append(f"--{key}" if value else f"--no-{key}")
        else:
            args += [f"--{key}", str(value)]
    return launch(nproc, args)
