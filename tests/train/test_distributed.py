"""Data parallelism: a 2-process Gloo run matches one process with the same total batch."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
import torch

from llmctl.config import load_config
from llmctl.runtime.checkpoint import load_training_state, read_checkpoint, read_weights
from llmctl.runtime.distributed import DistEnv, all_gather_json, all_reduce_
from llmctl.train.launch import torchrun_command
from llmctl.train.trainer import Trainer


def _assert_matches(reference: Path, other: Path, records, first_step: int = 1) -> None:
    a, b = records(reference)[first_step - 1:], records(other)
    assert [r["step"] for r in b] == [r["step"] for r in a]  # written once, by rank 0
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-4)
        assert rb["aux_loss"] == pytest.approx(ra["aux_loss"], abs=1e-4)
        # routed-token counts are summed over both ranks before the bias update
        assert rb["imbalance"] == pytest.approx(ra["imbalance"], abs=1e-6)
        assert rb["tokens"] == ra["tokens"]
    wa, wb = read_weights(reference / "latest"), read_weights(other / "latest")
    assert wa.keys() == wb.keys()
    for name, tensor in wa.items():
        torch.testing.assert_close(wb[name], tensor, atol=1e-4, rtol=1e-3)


@pytest.fixture
def flags(tiny, hetero):
    # 256 tokens per step: 4 micro-steps of 2x32 in one process, 2 per rank with two
    return tiny(max_iters=8, batch_size=2, total_batch_size=256, save_model=True, **hetero)


@pytest.fixture
def reference(flags) -> Path:
    return Trainer(load_config(overrides={**flags, "file_name": "one"}), verbose=False).fit(
    ).run_dir


@pytest.mark.slow
def test_two_gloo_ddp_processes_match_one(flags, reference, records, llmctl_train):
    proc = llmctl_train({**flags, "file_name": "ddp"}, extra_args=("--nproc", "2"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "2 process(es)" in out and "2 micro-step(s) x 2 x 32 x 2" in out
    assert out.count("done: 8 steps") == 1  # only rank 0 reports
    run = Path(flags["out_dir"]) / "ddp"
    _assert_matches(reference, run, records)
    _, state = load_training_state(run / "latest")
    assert len(state["rng"]) == 2 and state["world_size"] == 2  # every rank's generators


@pytest.mark.slow
def test_fsdp_stop_and_resume_match_one_process(flags, reference, records, llmctl_train):
    """FSDP2 over two Gloo ranks, stopped by SIGINT and resumed, also under one process."""
    run = Path(flags["out_dir"]) / "fsdp"
    proc = llmctl_train({**flags, "file_name": "fsdp"}, extra_args=("--nproc", "2", "--fsdp"))
    for line in proc.stdout:  # Ctrl-C: the launcher passes it to both workers
        if "step 3/" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "stopped by SIGINT after step" in out and "Traceback" not in out
    stopped_at = read_checkpoint(run / "latest").step
    assert 3 <= stopped_at < 8
    shutil.copytree(run / "latest", Path(flags["out_dir"]) / "stopped")

    proc = llmctl_train({**flags, "file_name": "fsdp", "resume": "auto"},
                        extra_args=("--nproc", "2", "--fsdp"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"at step {stopped_at}" in out
    _assert_matches(reference, run, records)

    # the sharded run's checkpoint resumes in a single process too (same total batch)
    single = {**flags, "file_name": "single", "resume": str(Path(flags["out_dir"]) / "stopped")}
    Trainer(load_config(overrides=single), verbose=False).fit()
    _assert_matches(reference, Path(flags["out_dir"]) / "single", records, stopped_at + 1)


def test_single_process_helpers_are_identity():
    env = DistEnv()
    assert env.is_main and not env.enabled
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(all_reduce_(t.clone(), "avg"), t)
    assert all_gather_json({"a": 1}) == [{"a": 1}]


def test_nproc_is_refused_inside_a_torchrun_job(monkeypatch):
    from llmctl.core.errors import LlmctlError
    from llmctl.train.launch import launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LlmctlError, match="inside a torchrun job"):
        launch(2, [])


def test_torchrun_command():
    cmd = torchrun_command(4, ["--config", "a.yaml", "--max_iters", "10"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                       "-m", "llmctl", "train", "--config", "a.yaml", "--max_iters", "10"]
