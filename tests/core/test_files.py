"""core.files writers: only a regular file is written over (a symlink to one is written
through and survives); a FIFO, device or folder is refused and left as it was."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from llmctl.core.errors import LlmctlError
from llmctl.core.files import (
    atomic_path,
    open_regular,
    swap_folder,
    write_text_atomic,
)


def _char_device(path: Path) -> Path:
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # our own node, never /dev/*
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("make, kind", [(_fifo, "a FIFO"), (_char_device, "a character device"),
                                        (Path.mkdir, "a folder")])
def test_atomic_writers_refuse_what_is_not_a_regular_file(tmp_path, make, kind):
    target = tmp_path / "out"
    make(target)
    mode = os.lstat(target).st_mode
    with pytest.raises(LlmctlError, match=rf"{target} is {kind}.*not a regular file"):
        write_text_atomic(target, "x")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(LlmctlError, match=rf"link \(a link to {target}\) is {kind}"), \
            atomic_path(link):
        raise AssertionError("the writer must not run")
    assert os.lstat(target).st_mode == mode and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "out"]  # no temp left


def test_a_symlink_to_a_file_is_written_through(tmp_path):
    (tmp_path / "real.txt").write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to("real.txt")
    write_text_atomic(link, "new")
    assert link.is_symlink() and os.readlink(link) == "real.txt"
    assert (tmp_path / "real.txt").read_text() == "new"
    write_text_atomic(tmp_path / "real.txt", "again")  # a plain file: replaced as before
    assert link.read_text() == "again"


def test_a_rewrite_keeps_the_files_mode(tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text("old")
    script.chmod(0o750)  # made executable by its user
    write_text_atomic(script, "new")
    assert script.read_text() == "new" and stat.S_IMODE(script.stat().st_mode) == 0o750


def test_swap_folder_still_replaces_a_folder(tmp_path):
    final, new, old = tmp_path / "latest", tmp_path / ".latest.new", tmp_path / ".latest.old"
    final.mkdir()
    new.mkdir()
    write_text_atomic(new / "config.json", "{}")
    swap_folder(new, final, old)
    assert (final / "config.json").read_text() == "{}" and old.is_dir() and not new.exists()


def test_open_regular_refuses_symlinks_fifos_and_devices(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / "link").symlink_to(victim)
    _fifo(tmp_path / "fifo")
    _char_device(tmp_path / "dev")
    for name, kind in (("link", "a symbolic link"), ("fifo", "a FIFO"),
                       ("dev", "a character device")):
        with pytest.raises(LlmctlError, match=f"lock {tmp_path / name} is {kind}"):
            open_regular(tmp_path / name, os.O_RDWR | os.O_CREAT, "lock")
    assert victim.read_text() == "keep"
    fd = open_regular(tmp_path / "new", os.O_RDWR | os.O_CREAT, "lock")  # created
    os.close(fd)
    assert (tmp_path / "new").is_file()
