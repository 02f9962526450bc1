"""A prepared dataset's own files as hostile input, through the real CLI: a corrupted split,
a meta.json field of the wrong type, a split too large to map, an absurd --bpe_vocab; each
is refused (exit 2, the file named) before any training step, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from .conftest import TINY
from .test_inputs import assert_refused, run_cli

pytestmark = pytest.mark.slow


def _dataset_copy(char_dataset, tmp_path: Path) -> tuple[Path, dict]:
    """A copy of the tiny char dataset's data_dir, and its meta.json."""
    data = tmp_path / "data"
    shutil.copytree(char_dataset("tiny", 60_000), data)
    return data, json.loads((data / "tiny" / "meta.json").read_text())


def _train(data: Path, tmp_path: Path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "data_dir": str(data),
                                   "out_dir": str(tmp_path / "out")}))
    return run_cli("train", "-c", cfg)


def _corrupt_ids(folder: Path, split: str) -> None:
    tokens = np.fromfile(folder / f"{split}.bin", dtype="<u2")
    tokens[::3] = 9999
    tokens.tofile(folder / f"{split}.bin")


@pytest.mark.parametrize("damage", ["token id", "tokenizer field"])
def test_a_damaged_dataset_is_refused_before_step_one(char_dataset, tmp_path, damage):
    data, meta = _dataset_copy(char_dataset, tmp_path)
    folder = data / "tiny"
    if damage == "token id":
        _corrupt_ids(folder, "train")
        needles = ["train.bin holds token id 9999", "--force"]
    else:  # a string for the object: once trained fully and lost at the checkpoint save
        meta["tokenizer"] = "char"
        (folder / "meta.json").write_text(json.dumps(meta))
        needles = ["meta.json", "tokenizer must be a JSON object"]
    assert_refused(_train(data, tmp_path), *needles)
    assert not list((tmp_path / "out").rglob("model.safetensors"))


def test_eval_full_names_a_corrupted_split(trained, char_dataset, tmp_path):
    data, _ = _dataset_copy(char_dataset, tmp_path)
    _corrupt_ids(data / "tiny", "val")
    assert_refused(run_cli("eval", trained["ckpt"], "--data_dir", data, "--full"),
                   "val.bin holds token id 9999")


def test_a_split_too_large_to_map_is_named(char_dataset, tmp_path):
    data, meta = _dataset_copy(char_dataset, tmp_path)
    folder = data / "tiny"
    size = 3 << 30  # sparse, beyond the child's 2 GiB of address space
    with open(folder / "train.bin", "r+b") as f:
        f.truncate(size)
    meta["splits"]["train"]["tokens"] = size // np.dtype(meta["dtype"]).itemsize
    (folder / "meta.json").write_text(json.dumps(meta))
    assert_refused(_train(data, tmp_path), "train.bin (train split", "cannot be memory-mapped")


def test_prepare_refuses_an_absurd_bpe_vocab(tmp_path):
    """100 million once aborted the process (out of memory inside the Rust trainer)."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 100)
    assert_refused(run_cli("prepare", "--source", corpus, "--name", "b", "--data_dir",
                           tmp_path / "data", "--tokenizer", "bpe", "--bpe_vocab", "100000000"),
                   "--bpe_vocab must be from 257", "1,048,576")
    assert not (tmp_path / "data" / "b").exists()
