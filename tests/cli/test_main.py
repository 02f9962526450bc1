"""The `llmctl` process itself: standard output that cannot be written is one clear line on
stderr and exit 2, not a traceback; a closed standard output is output nobody reads."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

COMMANDS = [["validate-config", "--json"], ["inspect-params", "--json"]]


def _llmctl(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmctl", *args], capture_output=False,
                          text=True, timeout=120, **kw)


@pytest.mark.parametrize("args", COMMANDS, ids=[a[0] for a in COMMANDS])
def test_stdout_on_a_full_device(tmp_path, args):
    full = tmp_path / "full"  # our own /dev/full: writes fail with ENOSPC
    try:
        os.mknod(full, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    except PermissionError:
        pytest.skip("making a device node needs root")
    with open(full, "w") as out:
        proc = _llmctl(*args, stdout=out, stderr=subprocess.PIPE)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("error: cannot write to standard output: No space left on "
                                   "device"), proc.stderr


def test_closed_stdout_still_runs():
    proc = subprocess.run(["bash", "-c", f"{sys.executable} -m llmctl validate-config --json "
                           ">&-"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_other_os_errors_still_surface(tmp_path):
    """Only stdout's own failures are reworded: a config that is a folder keeps its message."""
    proc = _llmctl("validate-config", "-c", str(tmp_path), stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)
    assert proc.returncode == 2 and "standard output" not in proc.stderr
