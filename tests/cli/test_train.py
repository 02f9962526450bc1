"""`llmctl train` through the CLI: the happy path, resume from a checkpoint alone, and bad
input, which always gets a clear message and exit code 2 (never a traceback)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.runtime.checkpoint import read_checkpoint

TINY = ["--dataset", "tiny", "--n_layer", "2", "--n_embd", "32", "--n_head", "2",
        "--block_size", "32", "--vocab_size", "64", "--up_dim", "64", "--batch_size", "4",
        "--total_batch_size", "128", "--max_iters", "3", "--log_interval", "1"]


@pytest.fixture(scope="module")
def data_dir(char_dataset) -> Path:
    return char_dataset("tiny", 30_000)


def _train(*args: str):
    return CliRunner().invoke(app, ["train", *args])


def _base(data_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [*TINY, "--data_dir", str(data_dir), "--out_dir", str(tmp_path / "runs"), *extra]


def test_help_lists_nproc_and_training_flags():
    result = _train("--help")
    assert result.exit_code == 0
    for flag in ("--nproc", "--resume", "--total_batch_size", "--eval", "--wandb_log",
                 "--peak_flops", "--act_recomp", "--compile"):
        assert flag in result.output


def test_trains_and_reports(data_dir, tmp_path):
    result = _train(*_base(data_dir, tmp_path, "--file_name", "ok"))
    assert result.exit_code == 0, result.output
    assert "training from scratch" in result.output
    assert "step 3/3 | loss" in result.output
    assert "done: 3 steps, last loss" in result.output
    assert "no checkpoint saved: train with --save_model" in result.output  # the default
    assert (tmp_path / "runs" / "ok" / "metrics.jsonl").is_file()


def test_resume_from_a_checkpoint_alone_continues_with_its_config(data_dir, tmp_path):
    first = _train(*_base(data_dir, tmp_path, "--file_name", "gqa", "--attn", "gqa",
                          "--n_kv_heads", "1", "--pos_emb", "rope", "--save_model"))
    assert first.exit_code == 0, first.output
    assert "no checkpoint saved" not in first.output
    latest = tmp_path / "runs" / "gqa" / "latest"
    # no model flags, no data flags: everything comes from the checkpoint
    result = _train("--resume", str(latest), "--max_iters", "5")
    assert result.exit_code == 0, result.output
    assert f"resumed from {latest} at step 3" in result.output
    info = read_checkpoint(latest)
    assert info.step == 5 and info.run.model.layers[0].attn == "gqa"
    assert info.run.train.max_iters == 5


def test_resume_from_a_checkpoint_with_flags_keeps_its_config(data_dir, tmp_path):
    first = _train(*_base(data_dir, tmp_path, "--file_name", "d", "--attn", "mqa",
                          "--save_model"))
    assert first.exit_code == 0, first.output
    latest = tmp_path / "runs" / "d" / "latest"
    # a flag that does not change the weights' shapes: still the checkpoint's config beneath
    result = _train("--resume", str(latest), "--max_iters", "4", "--dropout", "0.1")
    assert result.exit_code == 0, result.output
    info = read_checkpoint(latest)
    assert info.step == 4 and info.run.model.layers[0].attn == "mqa"
    assert info.run.model.dropout == 0.1 and info.run.model.block_size == 32


@pytest.mark.slow
def test_nproc_resume_from_a_checkpoint_alone(data_dir, tmp_path, monkeypatch):
    first = _train(*_base(data_dir, tmp_path, "--file_name", "n", "--save_model",
                          "--total_batch_size", "256"))  # 2 micro-steps, or 1 per rank
    assert first.exit_code == 0, first.output
    latest = tmp_path / "runs" / "n" / "latest"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = _train("--nproc", "2", "--resume", str(latest), "--max_iters", "5")
    assert result.exit_code == 0, result.output
    assert read_checkpoint(latest).step == 5


def test_resume_with_another_architecture_is_refused(data_dir, tmp_path):
    first = _train(*_base(data_dir, tmp_path, "--file_name", "a", "--save_model"))
    assert first.exit_code == 0, first.output
    result = _train(*_base(data_dir, tmp_path, "--file_name", "a", "--resume", "auto",
                           "--n_embd", "48", "--max_iters", "6"))
    assert result.exit_code == 2
    assert "different model architecture" in result.output
    assert "n_embd: checkpoint 32, now 48" in result.output
    assert read_checkpoint(tmp_path / "runs" / "a" / "latest").step == 3  # untouched


def _not_a_checkpoint(tmp_path: Path) -> list[str]:
    (tmp_path / "empty").mkdir()
    return ["--resume", str(tmp_path / "empty")]


def _pickle(tmp_path: Path) -> list[str]:
    torch.save({"w": torch.zeros(1)}, tmp_path / "model.pt")
    return ["--resume", str(tmp_path / "model.pt")]


def _out_dir_is_a_file(tmp_path: Path) -> list[str]:
    (tmp_path / "blocker").write_text("not a folder")
    return ["--out_dir", str(tmp_path / "blocker")]


BAD = {
    "unprepared dataset": (lambda tmp: ["--dataset", "nothere"],
                           r"dataset 'nothere' is not prepared .* run `llmctl prepare --source "
                           r"PATH --name nothere --data_dir .*` first"),
    "unprepared builtin": (lambda tmp: ["--dataset", "wikitext"],
                           r"run `llmctl prepare wikitext --data_dir"),
    "tokens beyond vocab": (lambda tmp: ["--vocab_size", "40"],
                            r"token ids up to \d+ .* the model's vocab_size is 40"),
    "out_dir not writable": (_out_dir_is_a_file, r"cannot write to the run folder"),
    "resume not a checkpoint": (_not_a_checkpoint, r"--resume .*is not a checkpoint"),
    "resume a pickle": (_pickle, r"never unpickles"),
    "batch split": (lambda tmp: ["--total_batch_size", "200"],
                    r"200 must be a multiple of batch_size × block_size = 4 × 32 = 128; "
                    r"nearest valid: 128 or 256"),
    "batch split for --nproc": (lambda tmp: ["--nproc", "2"],
                                r"128 must be a multiple of batch_size × block_size × "
                                r"world_size 2 = 4 × 32 × 2 = 256"),
    "bad device": (lambda tmp: ["--device", "cuda:7"] if not torch.cuda.is_available()
                   else ["--device", "cuda:99"], r"--device cuda"),
    "model that cannot fit": (lambda tmp: ["--n_embd", "65536"],
                              r"training 25,793,527,808 parameters .* needs about 384\.\d+ GiB "
                              r".* but only .* is available"),
    "batch that cannot fit": (lambda tmp: ["--batch_size", "100000000", "--total_batch_size",
                                           "3200000000"], r"activations \d+\.\d+ TiB"),
    "val too short for eval": (lambda tmp: ["--eval", "--block_size", "4000", "--batch_size",
                                            "1", "--total_batch_size", "4000"],
                               r"split 'val' .* too few for block_size 4000"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_message_not_a_traceback(data_dir, tmp_path, case):
    make, pattern = BAD[case]
    result = _train(*_base(data_dir, tmp_path, "--file_name", "bad"), *make(tmp_path))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert re.search(pattern, result.output, re.S), result.output


def test_a_fresh_run_never_mixes_with_an_earlier_one(data_dir, tmp_path):
    run = tmp_path / "runs" / "again"
    first = _train(*_base(data_dir, tmp_path, "--file_name", "again"))  # metrics only
    assert first.exit_code == 0, first.output
    old_metrics = (run / "metrics.jsonl").read_text()
    second = _train(*_base(data_dir, tmp_path, "--file_name", "again", "--save_model"))
    assert second.exit_code == 0, second.output
    set_aside = [p for p in run.glob("metrics.*.jsonl")]
    assert len(set_aside) == 1 and set_aside[0].read_text() == old_metrics  # kept, not mixed
    steps = [line for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 3  # only this run's records
    # now checkpoints exist: a third fresh run is refused, nothing touched
    third = _train(*_base(data_dir, tmp_path, "--file_name", "again", "--max_iters", "6"))
    assert third.exit_code == 2
    assert "already holds checkpoints of an earlier run (latest/)" in third.output
    assert "--resume auto" in third.output
    assert read_checkpoint(run / "latest").step == 3
    resumed = _train(*_base(data_dir, tmp_path, "--file_name", "again", "--max_iters", "6",
                            "--resume", "auto", "--save_model"))
    assert resumed.exit_code == 0, resumed.output
    assert read_checkpoint(run / "latest").step == 6
