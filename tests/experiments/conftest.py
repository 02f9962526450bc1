"""Fixtures for sweep / compare tests: a tiny base config (a few thousand parameters) on a
small prepared char-level dataset."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

# ~9k parameters with gqa or mla: a step takes milliseconds on one core
TINY_BASE: dict[str, Any] = {
    "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "attn": "gqa", "n_kv_heads": 1,
              "q_latent_dim": 16, "kv_latent_dim": 16, "rope_head_dim": 8,
              "pos_emb": "rope", "block_size": 32, "vocab_size": 64, "up_dim": 48,
              "norm": "rms"},
    "train": {"dataset": "tiny", "batch_size": 4, "total_batch_size": 128, "max_iters": 8,
              "warmup_steps": 2, "learning_rate": 3e-3, "log_interval": 1, "eval": True,
              "eval_interval": 4, "eval_iters": 2, "ckpt_interval": 4, "seed": 11,
              "device": "cpu"},
}
GRID = ["--set", "attn=gqa,mla", "--set", "pos_emb=rope,sin"]
POINTS = ["attn-gqa__pos_emb-rope", "attn-gqa__pos_emb-sin", "attn-mla__pos_emb-rope",
          "attn-mla__pos_emb-sin"]


@pytest.fixture(scope="session")
def exp_data(char_dataset) -> Path:
    return char_dataset("tiny", 40_000)


def write_base(folder: Path, data_dir: Path, **train: Any) -> Path:
    """base.yaml in `folder`, runs going to folder/runs; `train` overrides train keys."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model": dict(TINY_BASE["model"]),
              "train": {**TINY_BASE["train"], "data_dir": str(data_dir),
                        "out_dir": str(folder / "runs"), **train}}
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture
def base(exp_data: Path, tmp_path: Path) -> Callable[..., Path]:
    """base(**train_keys) -> a tiny base config writing runs under tmp_path/runs."""
    return lambda **train: write_base(tmp_path, exp_data, **train)


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "PYTHONUNBUFFERED": "1"}


def llmctl(*args: str, cwd: Path | None = None, timeout: float = 300,
           **kw: Any) -> subprocess.CompletedProcess:
    """`python -m llmctl ARGS` in a subprocess (output captured)."""
    return subprocess.run([sys.executable, "-m", "llmctl", *args], capture_output=True,
                          text=True, env=env(), cwd=cwd, timeout=timeout, **kw)


def weights(run_dir: Path, name: str = "latest") -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(run_dir / name / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    import torch

    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs between {a} and {b}"
