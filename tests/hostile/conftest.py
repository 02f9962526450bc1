"""Fixtures for hostile-input tests: one tiny trained run per session and broken copies of
its checkpoint."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

TINY = {"dataset": "tiny", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_kv_heads": 2,
        "block_size": 32, "vocab_size": 64, "up_dim": 64, "batch_size": 4,
        "total_batch_size": 128, "max_iters": 2, "warmup_steps": 1, "log_interval": 1,
        "eval_iters": 1, "seed": 7, "save_model": True}


@pytest.fixture(scope="session")
def trained(char_dataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny run trained 2 steps with --save_model: its data_dir and checkpoint."""
    from llmctl.config import load_config
    from llmctl.train.trainer import train

    data = char_dataset("tiny", 60_000)
    out = tmp_path_factory.mktemp("hostile_run")
    train(load_config(overrides={**TINY, "data_dir": str(data), "out_dir": str(out)}),
          verbose=False)
    ckpt = out / "llm_model" / "latest"
    assert (ckpt / "optimizer.pt").is_file()
    return {"data": data, "ckpt": ckpt}


@pytest.fixture
def broken(trained: dict[str, Path], tmp_path: Path) -> Callable[..., Path]:
    """broken(config=fn, state=fn, optimizer=fn) -> a copy of the checkpoint, each file
    edited by its function (which changes the loaded JSON / state dict in place)."""
    def make(config: Callable[[dict], Any] | None = None,
             state: Callable[[dict], Any] | None = None,
             optimizer: Callable[[dict], Any] | None = None) -> Path:
        import torch

        folder = tmp_path / "ckpt"
        shutil.copytree(trained["ckpt"], folder)
        for name, edit in (("config.json", config), ("trainer_state.json", state)):
            if edit is not None:
                data = json.loads((folder / name).read_text())
                edit(data)
                (folder / name).write_text(json.dumps(data))
        if optimizer is not None:
            data = torch.load(folder / "optimizer.pt", weights_only=True)
            optimizer(data)
            torch.save(data, folder / "optimizer.pt")
        return folder
    return make
