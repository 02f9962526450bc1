"""Run folders, `--resume` targets and the architecture check before a resume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from llmctl.config import load_config
from llmctl.core.errors import LlmctlError
from llmctl.runtime.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from llmctl.train.resume import architecture_differences, check_same_architecture, resume_target
from llmctl.train.run_folder import prepare_run_dir

TINY = {"attn": "mha", "n_layer": 2, "n_embd": 16, "n_head": 2, "block_size": 8,
        "vocab_size": 32, "total_batch_size": 16}


def _ckpt(path, step=3, **cfg):
    run = load_config({**TINY, **cfg})
    return save_checkpoint(path, state_dict={"w": torch.zeros(2)}, run=run, step=step)


def test_resume_auto_takes_latest_and_starts_fresh_without_one(tmp_path):
    assert resume_target("auto", tmp_path / "run") is None
    _ckpt(tmp_path / "run" / "best", step=2)
    assert resume_target("auto", tmp_path / "run") is None  # best alone is not resumed
    _ckpt(tmp_path / "run" / "latest", step=5)
    assert resume_target("auto", tmp_path / "run") == tmp_path / "run" / "latest"
    # an explicit run folder also means its latest (resolve_checkpoint alone prefers best)
    assert resume_target(str(tmp_path / "run"), tmp_path / "x") == tmp_path / "run" / "latest"
    assert resume_target(str(tmp_path / "run" / "best"), tmp_path / "x").name == "best"
    assert resume_target(None, tmp_path / "run") is None


def test_resume_auto_recovers_an_interrupted_save(tmp_path):
    _ckpt(tmp_path / "latest", step=4)
    os.replace(tmp_path / "latest", tmp_path / ".latest.old")
    assert read_checkpoint(resume_target("auto", tmp_path)).step == 4


@pytest.mark.parametrize("make", ["missing", "empty_dir", "file", "pickle"])
def test_bad_resume_paths(tmp_path, make):
    target = tmp_path / "ckpt"
    if make == "empty_dir":
        target.mkdir()
    elif make == "file":
        target.write_text("hello")
    elif make == "pickle":
        target = tmp_path / "model.pt"
        torch.save({"w": torch.zeros(1)}, target)
    with pytest.raises(CheckpointError, match=r"--resume .*(does not exist|not a checkpoint|"
                                              r"expected a checkpoint folder|never unpickles)"):
        resume_target(str(target), tmp_path)


def test_architecture_differences_are_listed():
    base = load_config(TINY).model
    assert architecture_differences(base, load_config(TINY).model) == []
    # dropout / init_std are not architecture; a mha layer ignores n_kv_heads
    same = load_config({**TINY, "dropout": 0.1, "init_std": 0.01, "n_kv_heads": 1}).model
    assert architecture_differences(base, same) == []
    moe = {"moe": True, "n_exp": 4, "n_shared": 1, "n_act": 2, "aux_free": True,
           "alpha": 1e-4, "gamma": 1e-3}
    retuned = {**moe, "alpha": 0.01, "gamma": 0.1}  # balancing strengths are not architecture
    assert architecture_differences(load_config({**TINY, **moe}).model,
                                    load_config({**TINY, **retuned}).model) == []
    switched = {**moe, "aux_free": False, "coeff": 0.01}
    assert "layers[0].aux_free: checkpoint True, now False" in architecture_differences(
        load_config({**TINY, **moe}).model, load_config({**TINY, **switched}).model)
    other = load_config({**TINY, "n_embd": 32, "attn": "gqa", "n_kv_heads": 1}).model
    diffs = architecture_differences(base, other)
    assert "n_embd: checkpoint 16, now 32" in diffs
    assert "layers[0].attn: checkpoint 'mha', now 'gqa'" in diffs
    assert "layers[1].kv_heads: checkpoint 2, now 1" in diffs


def test_check_same_architecture_refuses(tmp_path):
    info = read_checkpoint(_ckpt(tmp_path / "c"))
    check_same_architecture(info, load_config(TINY).model)
    with pytest.raises(LlmctlError, match=r"different model architecture:\n  n_layer: "
                                          r"checkpoint 2, now 3"):
        check_same_architecture(info, load_config({**TINY, "n_layer": 3}).model)


def test_unwritable_run_folder(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(LlmctlError, match="cannot write to the run folder"):
        prepare_run_dir(blocker / "run")
    assert prepare_run_dir(tmp_path / "ok" / "run").is_dir()


# ------------------------------------------------------------------ one writer per folder


def test_run_folder_lock_names_its_holder_and_dies_with_it(tmp_path):
    import subprocess
    import sys

    from llmctl.train.run_folder import RunFolderLock

    folder = prepare_run_dir(tmp_path / "run")
    busy = rf"in use by another `llmctl train` \(pid {os.getpid()}\)"
    # flock conflicts between open files, even in one process
    with RunFolderLock(folder), pytest.raises(LlmctlError, match=busy):
        RunFolderLock(folder).acquire()
    RunFolderLock(folder).acquire().release()  # released with the holder

    # a holder killed by SIGKILL leaves the lock free (the OS drops it)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from llmctl.train.run_folder import "
         "RunFolderLock; RunFolderLock(sys.argv[1]).acquire(); print('held', flush=True); "
         "time.sleep(60)", str(folder)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LlmctlError, match=rf"\(pid {holder.pid}\)"):
            RunFolderLock(folder).acquire()
    finally:
        holder.kill()
        holder.wait()
    RunFolderLock(folder).acquire().release()


def test_a_planted_lock_file_is_refused_and_its_target_kept(tmp_path):
    from llmctl.train.run_folder import RunFolderLock

    folder = prepare_run_dir(tmp_path / "run")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (folder / ".lock").symlink_to(victim)
    with pytest.raises(LlmctlError, match=r"\.lock is a symbolic link, not a regular file"):
        RunFolderLock(folder).acquire()
    assert victim.read_text() == "keep"
    (folder / ".lock").unlink()
    os.mkfifo(folder / ".lock")  # opened with O_NONBLOCK: refused, not waited on
    with pytest.raises(LlmctlError, match=r"\.lock is a FIFO"):
        RunFolderLock(folder).acquire()


@pytest.mark.parametrize("name", ["metrics.jsonl", "loss_curve.png"])
def test_a_fifo_where_the_run_writes_is_refused_before_training(tmp_path, name):
    folder = tmp_path / "run"
    folder.mkdir()
    os.mkfifo(folder / name)  # appending to it would block for ever
    with pytest.raises(LlmctlError, match=rf"run folder .*{name} is a FIFO"):
        prepare_run_dir(folder)
    (folder / name).unlink()
    (folder / name).mkdir()
    with pytest.raises(LlmctlError, match=rf"{name} is a folder"):
        prepare_run_dir(folder)


@pytest.mark.parametrize("how", ["file_in_the_way", "read_only"])
@pytest.mark.parametrize("nproc", [1, 2])
def test_an_out_dir_llmctl_cannot_write_is_named_before_any_work(tmp_path, tmpfs, char_data,
                                                                  cli_args, tiny, how, nproc):
    from typer.testing import CliRunner

    from llmctl.cli import app

    if how == "file_in_the_way":
        blocker = tmp_path / "runs"
        blocker.write_text("not a folder")
        out_dir, named = blocker / "deeper", f"{blocker} is a file, not a folder"
    else:
        disk = tmpfs.mount("64k")
        tmpfs.read_only(disk)
        out_dir, named = disk / "runs", "Read-only file system"
    flags = tiny(out_dir=str(out_dir), total_batch_size=256)
    result = CliRunner().invoke(app, ["train", *cli_args(flags), "--nproc", str(nproc)])
    assert result.exit_code == 2, result.output
    assert result.output.count("cannot write to the run folder") == 1, result.output
    assert named in result.output and "--out_dir" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_two_runs_on_one_folder_the_second_is_refused(tiny, llmctl_train, records):
    import signal

    from llmctl.runtime.checkpoint import read_checkpoint

    flags = tiny(file_name="shared", resume="auto", max_iters=100_000, save_model=True,
                 ckpt_interval=20, eval=False)
    first = llmctl_train(flags)
    for line in first.stdout:  # the first run holds the folder and is training
        if "step 2/" in line:
            break
    second = llmctl_train(flags)
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 2, out
    assert f"in use by another `llmctl train` (pid {first.pid})" in out
    assert "Traceback" not in out
    first.send_signal(signal.SIGINT)  # the first run was not disturbed: it stops cleanly
    rest, _ = first.communicate(timeout=120)
    assert first.returncode == 0 and "stopped by SIGINT" in rest, rest
    run = Path(flags["out_dir"]) / "shared"
    steps = [r["step"] for r in records(run)]
    assert steps == list(range(1, read_checkpoint(run / "latest").step + 1))  # each once
