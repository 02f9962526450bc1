"""Fixtures for trainer tests: a small prepared char-level dataset and tiny run configs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

CORPUS_CHARS = 60_000
# ~20k parameters: a step takes milliseconds on one CPU core
TINY: dict[str, Any] = {
    "dataset": "tiny", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_kv_heads": 2,
    "block_size": 32, "vocab_size": 64, "up_dim": 64, "batch_size": 4,
    "total_batch_size": 128, "max_iters": 12, "warmup_steps": 2, "learning_rate": 3e-3,
    "log_interval": 1, "eval_iters": 2, "seed": 7,
}
MOE_LAYER = {"attn": "gqa", "n_head": 2, "n_kv_heads": 1, "moe": True, "up_dim": 32,
             "non_linearity": "swiglu", "n_exp": 4, "n_shared": 1, "n_act": 2,
             "aux_free": True, "alpha": 0.01, "gamma": 0.01}
DENSE_LAYER = {"attn": "mha", "n_head": 2, "moe": False, "up_dim": 64, "non_linearity": "gelu"}
# heterogeneous: a dense block, then an aux-free MoE block (its biases are resume state)
HETERO = {"layer_configs": json.dumps([DENSE_LAYER, MOE_LAYER]), "n_layer": None}


@pytest.fixture(scope="session")
def char_data(char_dataset) -> Path:
    """data_dir holding the prepared char-level dataset `tiny` (60k characters)."""
    return char_dataset("tiny", CORPUS_CHARS)


@pytest.fixture
def tiny(char_data: Path, tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """tiny(**flags) -> flag overrides for a tiny run writing into tmp_path/runs."""
    def make(**extra: Any) -> dict[str, Any]:
        flags = {**TINY, "data_dir": str(char_data), "out_dir": str(tmp_path / "runs"),
                 **extra}
        return {k: v for k, v in flags.items() if v is not None}
    return make


def as_args(flags: dict[str, Any]) -> list[str]:
    """Command-line flags for `llmctl train` from an overrides dict."""
    args: list[str] = []
    for key, value in flags.items():
        if isinstance(value, bool):
            args.append(f"--{key}" if value else f"--no-{key}")
        else:
            args += [f"--{key}", str(value)]
    return args


@pytest.fixture
def cli_args() -> Callable[[dict[str, Any]], list[str]]:
    return as_args


def read_records(run_dir: Path, kind: str = "train") -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture
def records() -> Callable[..., list[dict[str, Any]]]:
    return read_records


@pytest.fixture
def hetero() -> dict[str, Any]:
    """Flags for the dense + aux-free MoE heterogeneous model."""
    return dict(HETERO)


def train_env(**extra: str) -> dict[str, str]:
    """Environment for `llmctl train` subprocesses: one torch thread each, offline wandb."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture
def llmctl_train(cli_args: Callable[[dict[str, Any]], list[str]]) -> Callable[..., Any]:
    """llmctl_train(flags, **popen_kw) -> a started `python -m llmctl train` subprocess."""
    import subprocess
    import sys

    started: list[subprocess.Popen] = []

    def start(flags: dict[str, Any], extra_args: tuple[str, ...] = (),
              **kw: Any) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "llmctl", "train", *cli_args(flags),
                                 *extra_args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=train_env(), **kw)
        started.append(proc)
        return proc

    yield start
    for proc in started:  # never leave a run behind
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- fine-tuning

CHAT = [
    {"messages": [{"role": "user", "content": "Good morrow!"},
                  {"role": "assistant", "content": "Well met, friend."}]},
    {"messages": [{"role": "user", "content": "What is the opposite of day?"},
                  {"role": "assistant", "content": "Night."},
                  {"role": "user", "content": "And of up?"},
                  {"role": "assistant", "content": "Down."}]},
] * 6


@pytest.fixture(scope="session")
def finetune_base(char_dataset, tmp_path_factory) -> dict:
    """A trained base checkpoint on the char dataset `tiny`, and a chat dataset with its
    tokenizer plus the three chat tokens (so the vocabulary grows by 3)."""
    from llmctl.config import load_config
    from llmctl.data.loader import PreparedDataset
    from llmctl.data.prepare import PrepareOptions, prepare_dataset
    from llmctl.train.trainer import train

    data = char_dataset("tiny", CORPUS_CHARS)
    root = tmp_path_factory.mktemp("init_base")
    # vocab_size exactly the tokenizer's: the chat tokens must grow it
    flags = {**TINY, "data_dir": str(data), "out_dir": str(root / "runs"), "max_iters": 4,
             "file_name": "base", "save_model": True,
             "vocab_size": PreparedDataset(data / "tiny").vocab_size}
    train(load_config(overrides=flags), verbose=False)
    chat_file = root / "chat.jsonl"
    chat_file.write_text("".join(json.dumps(r) + "\n" for r in CHAT), encoding="utf-8")
    meta = PreparedDataset(data / "tiny").meta
    prepare_dataset(PrepareOptions(source=str(chat_file), name="chat", data_dir=data,
                                   format="chat", base_tokenizer=meta["tokenizer"],
                                   base_tokenizer_folder=data / "tiny", progress=False,
                                   force=True))  # the infer tests build a second base
    return {"ckpt": root / "runs" / "base" / "latest", "data": data, "out": root / "runs"}



def finetune_flags(base: dict, **extra: Any) -> dict[str, Any]:
    """Flags of a run starting from the base (the architecture comes from it)."""
    flags = {k: v for k, v in TINY.items() if k not in ("n_layer", "n_embd", "n_head",
                                                        "n_kv_heads", "block_size",
                                                        "vocab_size", "up_dim")}
    return {**flags, "data_dir": str(base["data"]), "out_dir": str(base["out"]),
            "init_from": str(base["ckpt"]), **extra}
