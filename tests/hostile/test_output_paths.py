"""Output paths that are not regular files, through the real CLI: a FIFO, a device node or a
folder where llmctl writes is refused (exit 2) and left as it was; a symlink to a regular
file is written through and survives. Device nodes are made here, never /dev/* itself."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from .test_inputs import assert_refused, run_cli

pytestmark = pytest.mark.slow


def _nodes(folder: Path) -> dict[str, Path]:
    """A FIFO, a character device (1, 3: null), and a folder in `folder`."""
    nodes = {"fifo": folder / "fifo", "dev": folder / "dev", "dir": folder / "dir"}
    os.mkfifo(nodes["fifo"])
    os.mknod(nodes["dev"], 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    nodes["dir"].mkdir()
    return nodes


def _kinds(nodes: dict[str, Path]) -> dict[str, int]:
    return {name: stat.S_IFMT(os.lstat(p).st_mode) for name, p in nodes.items()}


def test_compare_refuses_outputs_that_are_not_regular_files(trained, tmp_path):
    run = trained["ckpt"].parent
    nodes = _nodes(tmp_path)
    kinds = _kinds(nodes)
    for flags, needle in ((["-o", nodes["fifo"]], "is a FIFO"),
                          (["--markdown", nodes["dev"]], "is a character device"),
                          (["--markdown", nodes["dir"]], "is a folder")):
        assert_refused(run_cli("compare", run, *flags, cwd=tmp_path), str(flags[1]), needle,
                       "not a regular file")
    assert _kinds(nodes) == kinds
    assert not list(tmp_path.glob("*.png")) and not list(run.glob("*.png"))  # nothing drawn


def test_a_symlinked_output_is_written_through(trained, tmp_path):
    real = tmp_path / "table.md"
    real.write_text("old")
    link = tmp_path / "link.md"
    link.symlink_to(real.name)
    result = run_cli("compare", trained["ckpt"].parent, "--markdown", link, "-o",
                     tmp_path / "fig.png", cwd=tmp_path)
    assert result.code == 0, result.stderr[-2000:]
    assert link.is_symlink() and real.read_text().startswith("| run |")


def test_sweep_slurm_script_through_a_symlink_and_onto_a_fifo(trained, tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"dataset": "tiny", "data_dir": str(trained["data"]),
                                    "out_dir": str(tmp_path / "runs"), "n_layer": 1,
                                    "n_embd": 32, "n_head": 2, "block_size": 32,
                                    "vocab_size": 64, "max_iters": 1}))
    sweep = ("sweep", "-c", base, "--set", "n_layer=1,2", "--name", "g", "--slurm")
    fifo = _nodes(tmp_path)["fifo"]
    assert_refused(run_cli(*sweep, fifo, cwd=tmp_path), f"{fifo} is a FIFO")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and not (tmp_path / "runs").exists()
    real = tmp_path / "job.sbatch"
    real.write_text("old")
    link = tmp_path / "link.sbatch"
    link.symlink_to(real)
    result = run_cli(*sweep, link, cwd=tmp_path)
    assert result.code == 0, result.stderr[-2000:]
    assert link.is_symlink() and "#SBATCH --array=0-1" in real.read_text()
    assert subprocess.run(["bash", "-n", str(link)]).returncode == 0


def _train(trained, out: Path, name: str):
    return run_cli("train", "--dataset", "tiny", "--data_dir", trained["data"], "--out_dir",
                   out, "--file_name", name, "--n_layer", 1, "--n_embd", 32, "--n_head", 2,
                   "--block_size", 32, "--vocab_size", 64, "--batch_size", 4,
                   "--total_batch_size", 128, "--max_iters", 1, "--warmup_steps", 1)


def test_train_refuses_a_planted_lock_and_a_fifo_for_its_records(trained, tmp_path):
    out = tmp_path / "runs"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (out / "lk").mkdir(parents=True)
    (out / "lk" / ".lock").symlink_to(victim)  # was followed and truncated to a pid
    assert_refused(_train(trained, out, "lk"), ".lock is a symbolic link, not a regular file")
    assert victim.read_text() == "keep"
    for name, file in (("lf", ".lock"), ("mf", "metrics.jsonl")):
        (out / name).mkdir()
        os.mkfifo(out / name / file)  # a FIFO metrics.jsonl made train block for ever
        assert_refused(_train(trained, out, name), f"{file} is a FIFO")
        assert sorted(p.name for p in (out / name).iterdir()) in ([file], [".lock", file])
