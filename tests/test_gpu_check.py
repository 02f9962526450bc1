"""benchmarks/gpu_check.py is ready to run: without CUDA it says so in JSON and exits 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU it measures for minutes")
def test_without_cuda_it_prints_a_clear_json_message_and_exits_0() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["cuda"] is False
    assert "no CUDA device" in report["message"]
    assert "Traceback" not in out.stderr


def _rehearse(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny",
                           "--skip_tests", "--out", str(out), *flags], capture_output=True,
                          text=True, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr
    report = json.loads(done.stdout)
    assert json.loads(out.read_text()) == report  # the file holds the same, final report
    return done, report


def test_a_cpu_rehearsal_runs_every_part_of_the_gpu_check(tmp_path: Path) -> None:
    """Every part at toy sizes on a CPU (eager: compiled training has its own tests), so the
    script's own code has run before it meets a GPU."""
    done, report = _rehearse(tmp_path, "--no_compile", "--train_steps", "1",
                             "--decode_tokens", "8")
    assert done.returncode == 0, report
    for part in ("gpt2_124m_train", "moe_16e_train_grouped_mm", "moe_16e_train_loop"):
        assert report[part]["tokens_per_s"] > 0, report[part]
        assert report[part]["batch_size"] == (64 if part == "gpt2_124m_train" else 16)
        assert report[part]["mfu"] is None  # no peak for a CPU: no made-up MFU
    assert report["moe_16e_train_grouped_mm"]["dispatch"] == "grouped_mm"
    assert report["moe_grouped_vs_loop"] > 0
    assert set(report["decode_batch1_bf16"]) == {"mha", "gqa", "mqa", "mla"}
    for row in report["decode_batch1_bf16"].values():
        assert row["fast_tokens_per_s"] > 0 and row["reference_tokens_per_s"] > 0
        assert row["same_tokens"] is True


def test_parts_past_the_time_budget_are_skipped_and_said_so(tmp_path: Path) -> None:
    done, report = _rehearse(tmp_path, "--budget_s", "1e-9")
    assert done.returncode == 0
    for part in ("gpt2_124m_train", "moe_16e_train_loop", "decode_batch1_bf16"):
        assert "time budget" in report[part]["skipped"]


@pytest.mark.parametrize("flag", ["--train_steps", "--decode_tokens", "--budget_s"])
def test_non_positive_numbers_are_refused_before_any_work(flag: str) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), flag, "0"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and f"{flag} must be positive" in done.stderr
    assert "Traceback" not in done.stderr
