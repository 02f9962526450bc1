"""train --init_from hf:PATH: a transformers folder becomes the start of a new run, exactly."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from llmctl.cli import app

pytest.importorskip("transformers")

from .conftest import CHARS  # noqa: E402
from .test_export import CASES  # noqa: E402


def _dataset(tmp_path, ckpt):
    """A char dataset whose vocabulary is exactly the checkpoint's (every character of it)."""
    import random

    from llmctl.data.prepare import PrepareOptions, prepare_dataset

    rng = random.Random(0)
    lines = ["".join(rng.choice(CHARS.strip()) for _ in range(60)) + " " for _ in range(300)]
    text = tmp_path / "corpus.txt"
    text.write_text(CHARS + "\n" + "\n".join(lines), encoding="utf-8")
    data = tmp_path / "data"
    prepare_dataset(PrepareOptions(source=str(text), name="hfdata", data_dir=data,
                                   tokenizer="char", progress=False))
    return data


def _train_flags(tmp_path, data, name: str, *, iters: int, total: int) -> list[str]:
    return ["--init_from", f"hf:{tmp_path / 'hf'}", "--dataset", "hfdata", "--data_dir",
            str(data), "--out_dir", str(tmp_path / "runs"), "--file_name", name,
            "--max_iters", str(iters), "--batch_size", "2", "--total_batch_size", str(total),
            "--save_model", "--eval_iters", "1", "--device", "cpu", "--seed", "5"]


@pytest.mark.parametrize("case", ["llama_gqa", "gpt2"])
def test_init_from_an_export_starts_from_its_exact_weights(case, checkpoint, tmp_path):
    from llmctl.infer.evaluate import EvalRequest, evaluate_checkpoint
    from llmctl.infer.load import load_checkpoint
    from llmctl.interop.hf_export import export_checkpoint
    from llmctl.interop.hf_init import IMPORT_FOLDER
    from llmctl.runtime.checkpoint import read_checkpoint, read_weights

    ckpt = checkpoint(CASES[case][0])
    export_checkpoint(ckpt, tmp_path / "hf")
    data = _dataset(tmp_path, ckpt)
    flags = _train_flags(tmp_path, data, "ft", iters=1, total=64)
    result = CliRunner().invoke(app, ["train", *flags])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "ft"
    imported = run_dir / IMPORT_FOLDER
    # the imported checkpoint is the original model, weight for weight
    original, got = read_weights(ckpt), read_weights(imported)
    assert original.keys() == got.keys()
    assert all(torch.equal(original[k], got[k]) for k in original)
    saved = read_checkpoint(run_dir / "latest").raw
    assert saved["init_from"]["path"] == str(imported.resolve()) and saved["step"] == 1
    assert read_checkpoint(imported).raw["imported_from"]["path"] == str(tmp_path / "hf")
    # the first step's loss is the original's loss on the trainer's first batch
    first = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"][0]["loss"]
    report = evaluate_checkpoint(load_checkpoint(ckpt, device="cpu"), EvalRequest(
        dataset="hfdata", data_dir=str(data), split="train", eval_iters=1, batch_size=2,
        seed=5))
    assert first == pytest.approx(report.loss, abs=1e-5)


def test_validate_config_resolves_hf_init_without_writing(checkpoint, tmp_path):
    from llmctl.interop.hf_export import export_checkpoint

    ckpt = checkpoint(CASES["llama_gqa"][0])
    export_checkpoint(ckpt, tmp_path / "hf")
    data = _dataset(tmp_path, ckpt)
    result = CliRunner().invoke(app, [
        "validate-config", "--init_from", f"hf:{tmp_path / 'hf'}", "--dataset", "hfdata",
        "--data_dir", str(data), "--out_dir", str(tmp_path / "runs"), "--batch_size", "2",
        "--total_batch_size", "64"])
    assert result.exit_code == 0, result.output
    assert "gqa" in result.output
    assert not (tmp_path / "runs").exists()


def test_init_from_a_missing_hf_folder_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(app, ["train", "--init_from", f"hf:{tmp_path / 'nope'}",
                                      "--out_dir", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert "not a transformers folder" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_hand_started_torchrun_imports_once_for_every_rank(checkpoint, tmp_path):
    """`torchrun --nproc_per_node 2 -m llmctl train --init_from hf:PATH` (not --nproc): every
    rank runs the command line; the first imports under the lock, the other uses that."""
    import os
    import subprocess

    from llmctl.interop.hf_export import export_checkpoint
    from llmctl.interop.hf_init import IMPORT_FOLDER
    from llmctl.runtime.checkpoint import read_checkpoint, read_weights
    from llmctl.train.launch import torchrun_command

    ckpt = checkpoint(CASES["llama_gqa"][0])
    export_checkpoint(ckpt, tmp_path / "hf")
    data = _dataset(tmp_path, ckpt)
    flags = _train_flags(tmp_path, data, "ddp", iters=2, total=128)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(torchrun_command(2, flags), capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "runs" / "ddp"
    saved = read_checkpoint(run_dir / "latest").raw
    assert saved["step"] == 2 and saved["init_from"]["path"] == str(
        (run_dir / IMPORT_FOLDER).resolve())
    original, got = read_weights(ckpt), read_weights(run_dir / IMPORT_FOLDER)
    assert all(torch.equal(original[k], got[k]) for k in original)


def test_a_finished_import_is_reused_and_a_changed_source_redone(checkpoint, tmp_path):
    from llmctl.interop.hf_export import export_checkpoint
    from llmctl.interop.hf_init import import_once

    ckpt = checkpoint(CASES["llama_gqa"][0])
    export_checkpoint(ckpt, tmp_path / "hf")
    folder = import_once(f"hf:{tmp_path / 'hf'}", tmp_path / "run" / "init_from_hf")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    import_once(f"hf:{tmp_path / 'hf'}", folder)  # what a second rank does: nothing
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    export_checkpoint(checkpoint(CASES["gpt2"][0]), tmp_path / "hf", force=True)
    import_once(f"hf:{tmp_path / 'hf'}", folder)  # another model there now: imported anew
    assert "gpt2" in (folder / "config.json").read_text()
