"""`train --nproc 2` fails like one process: checks before torchrun starts, a worker's error
once with exit 2 and no traceback, and no process outlives the launcher or a dead peer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmctl.runtime.checkpoint import read_checkpoint
from llmctl.train.launch import _children, _explain_failure, _format_errors
from llmctl.train.run_folder import RunFolderLock, prepare_run_dir


def _tree(pid: int) -> list[int]:
    """Every descendant of `pid` (torchrun, then its workers)."""
    found = []
    for child in _children(pid):
        found += [child, *_tree(child)]
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has stopped; it waits only to be reaped


def _survivors(pids: list[int], within_s: float = 15.0) -> list[int]:
    deadline = time.monotonic() + within_s
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if _alive(pid)]


def _run(flags, cli_args, *extra: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmctl", "train", *cli_args(flags),
                           "--nproc", "2", *extra], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture
def ddp(tiny):
    """Flags for a 2-rank run: 256 tokens per step, one micro-step of 4x32 per rank."""
    def make(**extra):
        return tiny(total_batch_size=256, eval=False, save_model=True, **extra)
    return make


# ------------------------------------------------------------------ before torchrun starts


@pytest.mark.parametrize("problem", ["corrupt_dataset", "missing_dataset", "locked_folder",
                                     "missing_resume", "old_checkpoints"])
def test_what_can_be_checked_is_checked_before_torchrun(problem, ddp, cli_args, tmp_path,
                                                        char_data):
    import shutil

    flags = ddp(file_name="pre")
    folder = Path(flags["out_dir"]) / "pre"
    lock = None
    if problem == "corrupt_dataset":
        bad = tmp_path / "bad"
        shutil.copytree(char_data, bad)
        (bad / "tiny" / "meta.json").write_text('{"vocab_size": ')
        flags["data_dir"], expected = str(bad), "meta.json is unreadable or corrupt"
    elif problem == "missing_dataset":
        flags["dataset"], expected = "nope", "nope"
    elif problem == "locked_folder":
        lock = RunFolderLock(prepare_run_dir(folder)).acquire()
        expected = f"in use by another `llmctl train` (pid {os.getpid()})"
    elif problem == "missing_resume":
        flags["resume"], expected = str(tmp_path / "gone"), "--resume"
    else:
        (folder / "latest").mkdir(parents=True)
        (folder / "latest" / "config.json").write_text("{}")
        (folder / "latest" / "model.safetensors").write_bytes(b"")
        expected = "already holds checkpoints of an earlier run"
    from typer.testing import CliRunner

    from llmctl.cli import app

    try:  # in-process: the launcher fails before it starts anything
        done = CliRunner().invoke(app, ["train", *cli_args(flags), "--nproc", "2"])
    finally:
        if lock is not None:
            lock.release()
    out = done.output
    assert done.exit_code == 2, out
    assert expected in out and out.count("error:") == 1, out
    for noise in ("Traceback", "ChildFailedError", "torch.distributed", "rank 1"):
        assert noise not in out, out
    assert not (folder / "metrics.jsonl").exists()


# ------------------------------------------------------------------ errors from the workers


def test_same_error_on_every_rank_is_told_once():
    notes = [{"rank": 0, "message": "the loss is nan", "exit_code": 2},
             {"rank": 1, "message": "the loss is nan", "exit_code": 2}]
    assert _format_errors(notes) == "error: the loss is nan"
    notes[1]["message"] = "disk full"
    assert _format_errors(notes) == "rank 0: error: the loss is nan\nrank 1: error: disk full"


# What torchrun 2.x prints when rank 1 of 2 is killed (its survivor's traceback, then its
# own ChildFailedError report), shortened.
_KILLED = """\
[rank0]: Traceback (most recent call last):
[rank0]: RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer.
W1201 22:57:10.516000 23638 torch/distributed/elastic/multiprocessing/api.py:1028] Sending \
process 23746 closing signal SIGTERM
E1201 22:57:17.478000 23638 torch/distributed/elastic/multiprocessing/api.py:1002] failed \
(exitcode: -9) local_rank: 1 (pid: 23747) of binary: /usr/bin/python
Traceback (most recent call last):
  File "torch/distributed/run.py", line 1032, in <module>
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 23746)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_22:57:10
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 23747)  (SIGKILL)
============================================================
"""


def test_a_killed_rank_is_the_summary_not_the_tracebacks():
    shown, summary = _explain_failure(_KILLED.splitlines(keepends=True), 1)
    assert shown == []
    assert summary.startswith("rank 1 (pid 23747) was killed by SIGKILL; torchrun stopped")
    crashed = _KILLED.replace("-9 (pid: 23747)", "1 (pid: 23747)")
    shown, summary = _explain_failure(crashed.splitlines(keepends=True), 1)
    assert "failed with exit code 1" in summary
    assert shown[0].startswith("[rank0]: Traceback")  # a crash keeps its traceback...
    assert not any("ChildFailedError" in line or "Sending process" in line for line in shown)


@pytest.mark.slow
def test_an_error_inside_the_workers_comes_out_once(ddp, cli_args):
    # every rank finds the loss non-finite at step 2 and stops with the same clean error
    done = _run(ddp(file_name="nan", learning_rate=1e30, grad_clip=0, max_iters=4), cli_args,
                timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert out.count("error: the loss is nan at step 2") == 1, out
    for noise in ("Traceback", "ChildFailedError", "rank 1: error"):
        assert noise not in out, out
    assert "step 1/4 | loss" in done.stdout  # a healthy run's output still streams


# ------------------------------------------------------------------ hard stops


def _start(llmctl_train, flags):
    proc = llmctl_train(flags, extra_args=("--nproc", "2"))
    for line in proc.stdout:  # running, with a checkpoint behind it
        if "step 5/" in line:
            return proc
    pytest.fail(f"the run ended early: {proc.communicate()[0]}")


@pytest.mark.slow
def test_kill_9_of_the_launcher_takes_every_worker_and_resume_is_clean(ddp, llmctl_train,
                                                                      records):
    flags = ddp(file_name="killed", max_iters=100_000, ckpt_interval=2)
    proc = _start(llmctl_train, flags)
    tree = _tree(proc.pid)  # torchrun and both workers
    assert len(tree) >= 3, tree
    proc.kill()
    proc.wait()
    assert _survivors(tree) == []  # nobody goes on training (or writing) after the kill

    run = Path(flags["out_dir"]) / "killed"
    saved = read_checkpoint(run / "latest").step
    rerun = llmctl_train({**flags, "max_iters": saved + 3, "resume": "auto"},
                         extra_args=("--nproc", "2"))
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert f"resumed from {run / 'latest'} at step {saved}" in out and "Traceback" not in out
    assert [r["step"] for r in records(run)] == list(range(1, saved + 4))  # none twice


@pytest.mark.slow
def test_a_dead_worker_stops_the_others_and_is_named(ddp, llmctl_train):
    proc = _start(llmctl_train, ddp(file_name="peer", max_iters=100_000))
    tree = _tree(proc.pid)
    victim = tree[-1]
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert _survivors(tree) == []
    assert f"(pid {victim}) was killed by SIGKILL; torchrun stopped the other processes" in out
    assert "Traceback" not in out and "ChildFailedError" not in out


@pytest.mark.gpu
def test_more_processes_than_gpus_is_refused_before_torchrun(ddp, cli_args):
    import torch
    from typer.testing import CliRunner

    from llmctl.cli import app

    n = torch.cuda.device_count() + 1
    flags = ddp(file_name="gpus", device="cuda", total_batch_size=128 * n)
    done = CliRunner().invoke(app, ["train", *cli_args(flags), "--nproc", str(n)])
    assert done.exit_code == 2, done.output
    assert f"--nproc {n} needs {n} CUDA devices" in done.output
