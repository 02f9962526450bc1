"""Exact resume through real processes: SIGKILL after a checkpoint, SIGTERM mid-run."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from llmctl.config import load_config
from llmctl.runtime.checkpoint import read_checkpoint, read_weights
from llmctl.train.trainer import Trainer

pytestmark = pytest.mark.slow
MAX_ITERS = 40


@pytest.fixture
def flags(tiny, hetero):
    # dropout (torch RNG), an aux-free MoE layer (bias buffers), eval + best (best val),
    # two micro-steps per step (sampler state mid-step), a multi-token prediction module
    # (whose block is the aux-free MoE layer again)
    return tiny(max_iters=MAX_ITERS, save_model=True, ckpt_interval=4, eval=True,
                eval_interval=10, eval_iters=2, dropout=0.1, batch_size=2, log_interval=5,
                mtp_depth=1, **hetero)


def _finish(proc, timeout=120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def _run_until(proc, marker: str, sig: int) -> str:
    """Read the run's output until a line contains `marker`, then send `sig`."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=120)
    return "".join(seen) + rest


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = read_weights(a), read_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def _train_losses(run_dir: Path) -> list[tuple[int, float]]:
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r.get("loss", r.get("val_loss"))) for r in map(json.loads, lines)]


def test_stop_kill_and_resume_end_exactly_like_an_uninterrupted_run(flags, llmctl_train):
    """SIGTERM mid-run, resume; SIGKILL after the next checkpoint, resume: same parameters."""
    out_dir = Path(flags["out_dir"])
    # the reference runs in this process (one torch thread, like the subprocesses)
    Trainer(load_config(overrides={**flags, "file_name": "ref"}), verbose=False).fit()
    reference, run = out_dir / "ref", out_dir / "b"

    # SIGTERM: the step finishes, latest is written, the process exits cleanly
    proc = llmctl_train({**flags, "file_name": "b"})
    out = _run_until(proc, "step 5/", signal.SIGTERM)
    assert proc.returncode == 0, out
    assert "stopped by SIGTERM after step" in out and "Traceback" not in out
    stopped_at = read_checkpoint(run / "latest").step
    assert 5 <= stopped_at < MAX_ITERS

    # resume, then SIGKILL (no chance to clean up) right after the next checkpoint
    proc = llmctl_train({**flags, "file_name": "b", "resume": "auto"})
    out = _run_until(proc, "saved latest checkpoint at step", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, out
    assert f"resumed from {run / 'latest'} at step {stopped_at}" in out
    killed_at = read_checkpoint(run / "latest").step
    assert stopped_at < killed_at < MAX_ITERS, "the run ended before it could be killed"

    # resume from the explicit path and finish
    _finish(llmctl_train({**flags, "file_name": "b", "resume": str(run / "latest")}))
    assert read_checkpoint(run / "latest").step == MAX_ITERS
    _assert_same_weights(reference / "latest", run / "latest")
    _assert_same_weights(reference / "best", run / "best")
    # the records of steps lost to the kill were dropped: the same log as the reference
    assert _train_losses(run) == _train_losses(reference)
