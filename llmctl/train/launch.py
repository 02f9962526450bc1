"""`--nproc N`: launch N data-parallel training processes on this machine through torchrun."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.errors import LlmctlError
from .resume import resolve_run_config


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


def launch(nproc: int, args: Sequence[str]) -> int:
    """Run the training job under torchrun and return its exit code.

    torchrun runs in its own session, so a Ctrl-C at the terminal reaches only us; we pass
    SIGINT / SIGTERM straight to the workers, which finish their step, save `latest` and
    exit cleanly (torchrun itself would turn the signal into a failure and a traceback).
    """
    if os.environ.get("WORLD_SIZE") not in (None, "1"):
        raise LlmctlError("--nproc cannot be used inside a torchrun job")
    proc = subprocess.Popen(torchrun_command(nproc, args), start_new_session=True)

    def forward(signum: int, frame: object) -> None:
        workers = _children(proc.pid)
        for pid in workers or [proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launch_training(nproc: int, config_files: list[Path], overrides: dict[str, Any]) -> int:
    """`llmctl train --nproc N ...`: check the config once here, then run the same command
    line in N torchrun workers; returns the exit code."""
    resolve_run_config(config_files, overrides, world_size=nproc)  # fail before spawning
    args: list[str] = []
    for path in config_files:
        args += ["--config", str(path)]
    for key, value in overrides.items():
        if isinstance(value, bool):
            args.append(f"--{key}" if value else f"--no-{key}")
        else:
            args += [f"--{key}", str(value)]
    return launch(nproc, args)
