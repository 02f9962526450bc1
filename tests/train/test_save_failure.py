"""A checkpoint save that fails mid-write (full disk) stops the run; the previous one is intact."""

from __future__ import annotations

import resource
import signal
from pathlib import Path

import pytest
import torch

from llmctl.config import load_config
from llmctl.runtime.checkpoint import read_checkpoint, read_weights
from llmctl.train.trainer import Trainer


def _limit_file_size(limit: int):
    def apply() -> None:
        # writes past `limit` fail with EFBIG, as writes on a full disk fail with ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny, llmctl_train):
    flags = tiny(file_name="full", save_model=True, ckpt_interval=2, max_iters=2)
    Trainer(load_config(overrides=flags), verbose=False).fit()
    latest = Path(flags["out_dir"]) / "full" / "latest"
    before = read_weights(latest)

    # the resumed run can append its log lines but not write a ~100 kB weights file
    proc = llmctl_train({**flags, "max_iters": 4, "resume": "auto"},
                        preexec_fn=_limit_file_size(40_000))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "could not write checkpoint" in out and "intact" in out
    assert "Traceback" not in out
    assert read_checkpoint(latest).step == 2
    after = read_weights(latest)
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert sorted(p.name for p in latest.parent.iterdir()) == [".lock", "latest", "metrics.jsonl"]
