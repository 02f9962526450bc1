"""A prepared dataset is checked as data when it is opened: meta.json field by field, chat
offsets, the tokenizer's files; token ids batch by batch; tokenizer specs and rank files."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from llmctl.core.errors import LlmctlError
from llmctl.data.loader import PreparedDataset, SequentialBatches
from llmctl.data.prepare import PrepareOptions, prepare_dataset
from llmctl.data.tokenizers import tokenizer_from_spec

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 200
CHAT = [{"messages": [{"role": "user", "content": f"hi {i}"},
                      {"role": "assistant", "content": f"yo {i}"}]} for i in range(8)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One byte-level text dataset, one chat dataset and one gpt2 dataset (with its rank
    file), prepared once; tests edit copies."""
    root = tmp_path_factory.mktemp("checks")
    (root / "corpus.txt").write_text(TEXT)
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    for name, extra in (("text", {"tokenizer": "byte"}), ("gpt2", {}),
                        ("chat", {"tokenizer": "byte", "format": "chat"})):
        source = root / ("chat.jsonl" if name == "chat" else "corpus.txt")
        prepare_dataset(PrepareOptions(source=str(source), name=name, data_dir=root / "data",
                                       progress=False, num_proc=1, val_fraction=0.25, **extra))
    return {name: root / "data" / name for name in ("text", "gpt2", "chat")}


@pytest.fixture
def copy(prepared: dict[str, Path], tmp_path: Path) -> Callable[..., Path]:
    """copy(name, edit=fn) -> a copy of a prepared dataset, its meta.json edited in place."""
    def make(name: str, edit: Callable[[dict], object] | None = None) -> Path:
        folder = tmp_path / name
        shutil.copytree(prepared[name], folder)
        if edit is not None:
            meta = json.loads((folder / "meta.json").read_text())
            edit(meta)
            (folder / "meta.json").write_text(json.dumps(meta))
        return folder
    return make


def _set(path: str, value: object) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        *parents, key = path.split(".")
        for part in parents:
            meta = meta[part]
        meta[key] = value
    return edit


@pytest.mark.parametrize(("name", "field", "value", "needle"), [
    ("text", "max_token_id", "zz", "max_token_id must be a whole number"),
    ("text", "eot_id", 10**9, "eot_id must be a whole number in [0, 256]"),
    ("text", "vocab_size", True, "vocab_size must be a whole number"),
    ("text", "tokenizer", "char", "tokenizer must be a JSON object, got 'char'"),
    ("text", "splits.train.tokens", "5", "splits.train needs 'file' and a token count"),
    ("text", "data_format", 3, "data_format 3 is not one of text, chat"),
    ("gpt2", "tokenizer.file", "../text/train.bin", "tokenizer.file must be a file name"),
    ("chat", "splits.train.conversations", "lots", "splits.train.conversations must be"),
    ("chat", "splits.train.mask", "../text/train.bin", "splits.train.mask must be a plain"),
    ("chat", "splits.val.offsets", "/etc/passwd", "splits.val.offsets must be a plain"),
])
def test_every_meta_field_is_checked_by_type_and_range(copy, name, field, value, needle):
    with pytest.raises(LlmctlError, match="not a valid dataset description") as err:
        PreparedDataset(copy(name, _set(field, value)))
    assert needle in str(err.value) and "meta.json" in str(err.value)


def test_meta_problems_are_reported_at_once(copy):
    def edit(meta: dict) -> None:
        meta["max_token_id"], meta["tokenizer"]["kind"] = -1, "chars"
    with pytest.raises(LlmctlError) as err:
        PreparedDataset(copy("text", edit))
    assert "max_token_id" in str(err.value) and "'chars' is not one of" in str(err.value)


@pytest.mark.parametrize("damage", ["all ones", "not rising", "beyond the tokens"])
def test_chat_offsets_are_checked_when_the_split_is_opened(copy, damage):
    folder = copy("chat")
    path = folder / "train.offsets.bin"
    offsets = np.fromfile(path, dtype="<u8")
    if damage == "all ones":
        offsets[:] = np.iinfo(np.uint64).max
    elif damage == "not rising":
        offsets[2], offsets[3] = offsets[3], offsets[2]
    else:
        offsets[-1] = 10**15
    offsets.tofile(path)
    with pytest.raises(LlmctlError, match="train.offsets.bin is not a list of conversation"):
        PreparedDataset(folder).random_batches("train", 2, 16, seed=0)


def test_chat_data_without_a_target_within_block_size_is_refused(prepared):
    """Windows cut before the first assistant token leave the loss nothing (its mean: NaN),
    which training reported as divergence, advising a lower learning rate."""
    dataset = PreparedDataset(prepared["chat"])
    with pytest.raises(LlmctlError, match=r"only 0 of \d+ conversations have an assistant token "
                       "within their first block_size=2 tokens"):
        dataset.random_batches("train", 2, 2, seed=0)
    _, y = dataset.random_batches("train", 2, 16, seed=0).next_batch()
    assert (y >= 0).any()


def test_a_token_id_beyond_the_vocabulary_is_named_per_batch(copy):
    folder = copy("text")
    tokens = np.fromfile(folder / "train.bin", dtype="<u2")
    tokens[::5] = 9999
    tokens.tofile(folder / "train.bin")
    dataset = PreparedDataset(folder)  # opening reads no token: the check is per batch
    needle = r"train.bin holds token id 9999, but its meta.json allows ids up to 256"
    with pytest.raises(LlmctlError, match=needle):
        dataset.random_batches("train", 4, 16, seed=0).next_batch()
    with pytest.raises(LlmctlError, match=needle):
        list(SequentialBatches(dataset.tokens("train"), 4, 16))
    assert len(list(SequentialBatches(dataset.tokens("val"), 4, 16)))  # val is intact


def test_a_chat_token_beyond_the_vocabulary_is_named(copy):
    folder = copy("chat")
    tokens = np.fromfile(folder / "train.bin", dtype="<u2")
    tokens[:] = 60000
    tokens.tofile(folder / "train.bin")
    with pytest.raises(LlmctlError, match="train.bin holds token id 60000"):
        PreparedDataset(folder).random_batches("train", 2, 16, seed=0).next_batch()


@pytest.mark.parametrize("damage", ["fifo", "sparse", "edited"])
def test_tokenizer_files_are_checked_when_the_dataset_is_opened(copy, damage):
    """Training copies them into its checkpoints only when it saves: check them first."""
    folder = copy("gpt2")
    rank_file = folder / "tokenizer.tiktoken"
    if damage == "fifo":
        rank_file.unlink()
        os.mkfifo(rank_file)
    elif damage == "sparse":
        os.truncate(rank_file, 300 << 20)
    else:
        with open(rank_file, "ab") as f:
            f.write(b"\n")
    needle = {"fifo": "is a FIFO", "sparse": "larger than 256.00 MiB",
              "edited": "does not match the sha256"}[damage]
    with pytest.raises(LlmctlError, match=needle) as err:
        PreparedDataset(folder)
    assert "tokenizer.tiktoken" in str(err.value) and "--force" in str(err.value)


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("special_tokens", ["<|endoftext|>"], "special_tokens must map token strings to ids"),
    ("special_tokens", {"<|endoftext|>": "x"}, "special_tokens must map token strings"),
    ("added_tokens", "abc", "added_tokens must be a list of distinct non-empty strings"),
    ("pat_str", 5, "pat_str must be a string"),
    ("sha256", "zz", "sha256 must be 64 lowercase hex digits"),
])
def test_tiktoken_spec_fields_are_checked_as_data(prepared, key, value, needle):
    spec = json.loads((prepared["gpt2"] / "meta.json").read_text())["tokenizer"]
    with pytest.raises(LlmctlError, match=needle):
        tokenizer_from_spec({**spec, key: value}, prepared["gpt2"])


def test_rank_files_are_read_with_a_bound(prepared, tmp_path, monkeypatch):
    spec = json.loads((prepared["gpt2"] / "meta.json").read_text())["tokenizer"]
    huge = tmp_path / "tokenizer.tiktoken"
    with open(huge, "wb") as f:
        f.truncate(300 << 20)  # sparse: refused by its size, never read into memory
    with pytest.raises(LlmctlError, match="larger than 256.00 MiB"):
        tokenizer_from_spec(spec, tmp_path)
    bare = {k: v for k, v in spec.items() if k != "file"}
    os.mkfifo(tmp_path / "fifo")
    for env, needle in (("/dev/zero", "character device"), (str(tmp_path / "fifo"), "FIFO")):
        monkeypatch.setenv("LLMCTL_TIKTOKEN_FILE", env)
        with pytest.raises(LlmctlError, match=needle):
            tokenizer_from_spec(bare, None)


@pytest.mark.parametrize("vocab", [256, 2**20 + 1])
def test_bpe_vocab_is_bounded_before_training(tmp_path, vocab):
    (tmp_path / "c.txt").write_text(TEXT)
    with pytest.raises(LlmctlError, match=r"--bpe_vocab must be from 257 .* to 1,048,576"):
        prepare_dataset(PrepareOptions(source=str(tmp_path / "c.txt"), name="b",
                                       data_dir=tmp_path / "data", tokenizer="bpe",
                                       bpe_vocab=vocab, progress=False, num_proc=1))
