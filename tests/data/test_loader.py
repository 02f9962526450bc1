"""The loader: memory-mapped splits, seeded windows shared out over ranks, eval windows."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from llmctl.core.errors import LlmctlError
from llmctl.data.loader import (
    PreparedDataset,
    RandomBatchSampler,
    SequentialBatches,
    window_starts,
)
from llmctl.data.prepare import PrepareOptions, prepare_dataset
from llmctl.data.tokenizers import tokenizer_from_spec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A prepared byte-level dataset of ~20k tokens."""
    root = tmp_path_factory.mktemp("loader")
    source = root / "corpus.txt"
    source.write_text("".join(f"line {i}: the quick brown fox {i * i}\n" for i in range(600)))
    prepare_dataset(PrepareOptions(source=str(source), name="tiny", data_dir=root / "data",
                                   tokenizer="byte", progress=False, num_proc=1))
    return root / "data"


def _arange_tokens(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint16)


def test_open_maps_splits_and_tokenizer(tiny):
    ds = PreparedDataset.open(tiny, "tiny")
    train = ds.tokens("train")
    assert isinstance(train, np.memmap) and train.dtype == np.dtype("<u2")
    assert len(train) == ds.num_tokens("train") and ds.splits == ["train", "val"]
    text = ds.tokenizer.decode(np.concatenate([train, ds.tokens("val")]).tolist())
    assert text.startswith("line 0: the quick brown fox 0\n") and text.endswith("<|endoftext|>")
    assert (ds.vocab_size, ds.eot_id, ds.max_token_id) == (257, 256, 256)
    assert ds.tokenizer_files() == []


def test_random_batches_are_shifted_windows(tiny):
    ds = PreparedDataset.open(tiny, "tiny")
    sampler = ds.random_batches("train", batch_size=4, block_size=16, seed=7)
    tokens = np.asarray(ds.tokens("train"), dtype=np.int64)
    starts = sampler.starts()
    x, y = sampler.next_batch()
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 16)
    for row, start in enumerate(starts):
        assert x[row].tolist() == tokens[start:start + 16].tolist()
        assert y[row].tolist() == tokens[start + 1:start + 17].tolist()
    assert not np.array_equal(sampler.starts(), starts)  # advanced


def test_ranks_split_the_global_batch_like_accumulation_steps():
    tokens = _arange_tokens(5000)
    one = RandomBatchSampler(tokens, batch_size=4, block_size=8, seed=3)
    micro = RandomBatchSampler(tokens, batch_size=2, block_size=8, seed=3)
    ranks = [RandomBatchSampler(tokens, 2, 8, 3, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        x1, y1 = one.next_batch()
        xm = torch.cat([micro.next_batch()[0], micro.next_batch()[0]])  # 2 accumulation steps
        xr = [s.next_batch()[0] for s in ranks]
        assert torch.equal(torch.cat(xr), x1) and torch.equal(xm, x1)
        assert not torch.equal(xr[0], xr[1])
    assert one.state_dict()["samples_drawn"] == ranks[1].state_dict()["samples_drawn"] == 20


def test_state_dict_resumes_exactly_through_json():
    tokens = _arange_tokens(3000)
    straight = RandomBatchSampler(tokens, 3, 10, seed=11)
    expected = [straight.next_batch() for _ in range(6)]
    first = RandomBatchSampler(tokens, 3, 10, seed=11)
    for _ in range(2):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = RandomBatchSampler(tokens, 3, 10, seed=999)  # the state's seed wins
    resumed.load_state_dict(state)
    for x, y in expected[2:]:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)
    other = RandomBatchSampler(_arange_tokens(2999), 3, 10, seed=11)
    with pytest.raises(LlmctlError, match="num_tokens"):
        other.load_state_dict(state)


def test_windows_cover_every_start_evenly():
    num_starts = 50
    starts = window_starts(5, np.arange(100_000), num_starts)
    assert starts.min() == 0 and starts.max() == num_starts - 1
    counts = np.bincount(starts, minlength=num_starts)
    assert counts.min() > 1700 and counts.max() < 2300  # expected 2000 each, sd ~44
    assert not np.array_equal(window_starts(6, np.arange(100), num_starts), starts[:100])


@pytest.mark.parametrize("n, block, batch", [(103, 10, 3), (101, 10, 4), (12, 20, 2)])
def test_sequential_windows_predict_every_token_once(n, block, batch):
    tokens = _arange_tokens(n)
    seq = SequentialBatches(tokens, batch, block)
    batches = list(seq)
    assert len(batches) == len(seq)
    xs = torch.cat([x.flatten() for x, _ in batches])
    ys = torch.cat([y.flatten() for _, y in batches])
    assert xs.tolist() == list(range(n - 1)) and ys.tolist() == list(range(1, n))
    assert seq.num_targets == n - 1
    full, tail = divmod(n - 1, block)
    assert all(x.shape[1] == block for x, _ in batches[:len(batches) - bool(tail)])
    if tail:
        assert batches[-1][0].shape == (1, tail)
    shards = [SequentialBatches(tokens, batch, block, rank=r, world_size=2) for r in range(2)]
    targets = sorted(t for s in shards for _, y in s for t in y.flatten().tolist())
    assert targets == list(range(1, n)) and sum(s.num_targets for s in shards) == n - 1


def test_check_vocab_names_both_numbers(tiny):
    ds = PreparedDataset.open(tiny, "tiny")
    ds.check_vocab(257)
    with pytest.raises(LlmctlError, match=r"ids up to 256.*vocab_size is 200.*at least 257"):
        ds.check_vocab(200)


def test_missing_and_damaged_datasets_say_what_to_run(tiny, tmp_path):
    with pytest.raises(LlmctlError, match=r"run `llmctl prepare shakespeare --data_dir "):
        PreparedDataset.open(tmp_path, "shakespeare")
    with pytest.raises(LlmctlError, match=r"llmctl prepare --source PATH --name mine"):
        PreparedDataset.open(tmp_path, "mine")
    broken = tmp_path / "tiny"
    shutil.copytree(tiny / "tiny", broken)
    (broken / "meta.json").write_text("{not json")
    with pytest.raises(LlmctlError, match="corrupt.*--force"):
        PreparedDataset(broken)
    (broken / "meta.json").unlink()
    with pytest.raises(LlmctlError, match="no meta.json"):
        PreparedDataset(broken)
    shutil.copy(tiny / "tiny" / "meta.json", broken / "meta.json")
    with open(broken / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(LlmctlError, match="val.bin has 10 bytes"):
        PreparedDataset(broken)
    meta = json.loads((tiny / "tiny" / "meta.json").read_text())
    (broken / "meta.json").write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(LlmctlError, match="newer"):
        PreparedDataset(broken)


def test_split_too_small_for_block_size(tiny):
    ds = PreparedDataset.open(tiny, "tiny")
    n = ds.num_tokens("val")
    with pytest.raises(LlmctlError, match=rf"'val'.*{n:,} tokens.*block_size {n}"):
        ds.random_batches("val", 2, n, seed=0)
    with pytest.raises(LlmctlError, match="no split 'test'"):
        ds.tokens("test")


def test_rank_file_dataset_rebuilds_its_tokenizer_elsewhere(gpt2_tiktoken, shakespeare_txt,
                                                            tmp_path, reference_gpt2):
    prepare_dataset(PrepareOptions(source=str(shakespeare_txt), name="sh", data_dir=tmp_path,
                                   tokenizer_file=gpt2_tiktoken, max_tokens=2000,
                                   progress=False, num_proc=1))
    ds = PreparedDataset.open(tmp_path, "sh")
    text = shakespeare_txt.read_text(encoding="utf-8")
    assert ds.tokens("train").tolist() == reference_gpt2.encode_ordinary(text)[:1800]
    checkpoint = tmp_path / "checkpoint"  # what the trainer copies into a checkpoint
    checkpoint.mkdir()
    for path in ds.tokenizer_files():
        shutil.copy(path, checkpoint / path.name)
    spec = json.loads(json.dumps(ds.tokenizer_spec))
    tok = tokenizer_from_spec(spec, checkpoint)
    head = ds.tokens("train")[:50].tolist()
    assert tok.decode(head) == reference_gpt2.decode(head) and text.startswith(tok.decode(head))
    assert tok.encode(text[:5000]) == reference_gpt2.encode_ordinary(text[:5000])
