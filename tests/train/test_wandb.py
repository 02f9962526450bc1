"""Weights & Biases logging with the real library in offline mode; resume keeps the run id."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from llmctl.config import load_config
from llmctl.runtime.checkpoint import load_training_state
from llmctl.train.trainer import Trainer

_BLOCK = 32 * 1024
_HEADER = 7  # ":W&B", magic 0xBEE1, version 1


def _records(path: Path) -> list[bytes]:
    """Payloads of a .wandb file (LevelDB log format: 32 KiB blocks of chunked records)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    out, pending, pos = [], b"", _HEADER
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # FULL
            out.append(chunk)
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            out.append(pending + chunk)
    return out


def _parse(file: Path) -> tuple[str | None, list[dict], bool]:
    from wandb.proto import wandb_internal_pb2 as pb

    run_id, rows, finished = None, [], False
    for payload in _records(file):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
        elif kind == "exit":
            finished = True
    return run_id, rows, finished


def _history(run_folder: Path) -> tuple[str | None, list[dict]]:
    """Run id and history rows of an offline run, once wandb's writer has finished it."""
    (file,) = run_folder.glob("run-*.wandb")
    deadline = time.monotonic() + 30
    while True:  # the file is written by wandb's service process, possibly after finish()
        run_id, rows, finished = _parse(file)
        if finished or time.monotonic() > deadline:
            return run_id, rows
        time.sleep(0.2)


def test_offline_run_files_and_resume_keep_the_run(tiny, hetero, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    flags = tiny(file_name="wb", wandb_log=True, wandb_project="llmctl-test",
                 wandb_run_name="tiny-run", save_model=True, max_iters=3, ckpt_interval=3,
                 **hetero)
    Trainer(load_config(overrides=flags), verbose=False).fit()
    run_dir = Path(flags["out_dir"]) / "wb"
    _, state = load_training_state(run_dir / "latest")
    run_id = state["wandb_run_id"]
    assert run_id

    resumed = {**flags, "max_iters": 5, "resume": "auto"}
    Trainer(load_config(overrides=resumed), verbose=False).fit()

    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(run_id) for f in folders)
    (first_id, first), (second_id, second) = _history(folders[0]), _history(folders[1])
    assert first_id == second_id == run_id
    assert [row["_step"] for row in first] == [1, 2, 3]
    assert [row["_step"] for row in second] == [4, 5]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row, record in zip(first + second, metrics, strict=True):
        assert row["loss"] == pytest.approx(record["loss"])
        assert row["lr"] == pytest.approx(record["lr"])
        assert row["imbalance/layer_0"] == pytest.approx(record["imbalance"][0])


def test_unset_run_name_is_the_unix_time_the_run_starts(tiny, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    flags = tiny(file_name="wb_name", wandb_log=True, wandb_project="llmctl-test", max_iters=1)
    run = load_config(overrides=flags)
    assert run.train.wandb_run_name is None  # the config itself holds no time
    before = int(time.time())
    trainer = Trainer(run, verbose=False)
    trainer.fit()
    name = trainer.wandb.run.name
    assert name.isdigit() and before <= int(name) <= int(time.time())
    assert run.train.wandb_run_name is None
