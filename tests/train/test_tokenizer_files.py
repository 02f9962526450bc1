"""Checkpoints carry the dataset's tokenizer (spec and rank file): they need nothing else."""

from __future__ import annotations

import shutil

import torch

from llmctl.config import load_config
from llmctl.data.prepare import PrepareOptions, prepare_dataset
from llmctl.infer.load import load_checkpoint
from llmctl.runtime.checkpoint import read_checkpoint
from llmctl.train.trainer import Trainer


def test_gpt2_rank_file_is_copied_and_the_checkpoint_stands_alone(tmp_path, shakespeare_txt,
                                                                   gpt2_tiktoken):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_txt.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    prepared = prepare_dataset(PrepareOptions(
        source=str(corpus), name="gpt2tiny", data_dir=tmp_path / "data",
        tokenizer_file=gpt2_tiktoken, progress=False, num_proc=1))
    spec = prepared.meta["tokenizer"]
    assert spec.get("file")  # this tokenizer needs a file beside meta.json

    flags = {"dataset": "gpt2tiny", "data_dir": str(tmp_path / "data"),
             "out_dir": str(tmp_path / "runs"), "file_name": "g", "n_layer": 1, "n_embd": 16,
             "n_head": 2, "block_size": 16, "vocab_size": 50304, "up_dim": 32,
             "batch_size": 2, "total_batch_size": 32, "max_iters": 2, "save_model": True}
    Trainer(load_config(overrides=flags), verbose=False).fit()
    latest = tmp_path / "runs" / "g" / "latest"
    assert (latest / spec["file"]).read_bytes() == gpt2_tiktoken.read_bytes()
    assert read_checkpoint(latest).tokenizer == spec

    shutil.rmtree(tmp_path / "data")  # sample / eval must not need the dataset
    loaded = load_checkpoint(latest, device="cpu")
    assert loaded.tokenizer.encode("Hello world") == [15496, 995]  # GPT-2's ids
    ids = torch.tensor([loaded.tokenizer.encode("Hello world")])
    assert loaded.model(ids).logits.shape == (1, 2, 50304)


def test_trained_bpe_is_copied_and_the_checkpoint_stands_alone(tmp_path, shakespeare_txt):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_txt.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    prepared = prepare_dataset(PrepareOptions(
        source=str(corpus), name="bpetiny", data_dir=tmp_path / "data", tokenizer="bpe",
        bpe_vocab=300, progress=False, num_proc=1))
    spec = prepared.meta["tokenizer"]
    assert spec["kind"] == "bpe" and spec["file"] == "tokenizer.json"
    flags = {"dataset": "bpetiny", "data_dir": str(tmp_path / "data"),
             "out_dir": str(tmp_path / "runs"), "file_name": "b", "n_layer": 1, "n_embd": 16,
             "n_head": 2, "block_size": 16, "vocab_size": 320, "up_dim": 32,
             "batch_size": 2, "total_batch_size": 32, "max_iters": 2, "save_model": True}
    Trainer(load_config(overrides=flags), verbose=False).fit()
    latest = tmp_path / "runs" / "b" / "latest"
    data_file = tmp_path / "data" / "bpetiny" / "tokenizer.json"
    assert (latest / "tokenizer.json").read_bytes() == data_file.read_bytes()
    shutil.rmtree(tmp_path / "data")  # sample / eval must not need the dataset
    loaded = load_checkpoint(latest, device="cpu")
    assert loaded.tokenizer.kind == "bpe"
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("ROMEO: hi")) == "ROMEO: hi"
