"""Chat data: the template, the loss mask (assistant tokens only), malformed rows by line,
whole-conversation batches, and the masked loss against a hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmctl.core.errors import LlmctlError
from llmctl.data.chat import ASSISTANT, END_OF_TURN, USER
from llmctl.data.loader import ChatBatchSampler, PreparedDataset
from llmctl.data.prepare import PrepareOptions, prepare_dataset
from llmctl.data.tokenizers import ExtendedTokenizer, tokenizer_from_spec

TWO_TURNS = {"messages": [
    {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "more"}, {"role": "assistant", "content": "ok!"}]}
SHAREGPT = {"conversations": [{"from": "system", "value": "be kind"},
                              {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}


def _prepare(tmp_path: Path, rows: list, name: str = "chat", **kw) -> Path:
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                   encoding="utf-8")
    prepare_dataset(PrepareOptions(source=str(src), name=name, data_dir=tmp_path / "data",
                                   format="chat", tokenizer="byte", progress=False,
                                   val_fraction=0.5, **kw))
    return tmp_path / "data" / name


def test_meta_records_the_special_tokens_after_the_base_vocabulary(tmp_path):
    folder = _prepare(tmp_path, [TWO_TURNS, SHAREGPT] * 3)
    meta = json.loads((folder / "meta.json").read_text())
    # byte: 256 bytes + end-of-text = 257, then the chat tokens in order
    assert meta["special_tokens"] == {USER: 257, ASSISTANT: 258, END_OF_TURN: 259,
                                      "<|system|>": 260}
    assert meta["vocab_size"] == 261 and meta["data_format"] == "chat"
    tok = tokenizer_from_spec(meta["tokenizer"], folder)
    assert isinstance(tok, ExtendedTokenizer) and tok.vocab_size == 261
    assert tok.encode("<|user|>") == list(b"<|user|>")  # text never becomes a special token
    ds = PreparedDataset(folder)
    total = sum(ds.num_tokens(s) for s in ("train", "val"))
    assert total == sum(meta["splits"][s]["tokens"] for s in ("train", "val"))
    assert meta["splits"]["train"]["conversations"] + meta["splits"]["val"]["conversations"] == 6


def test_only_assistant_tokens_and_their_end_of_turn_are_targets(tmp_path):
    folder = _prepare(tmp_path, [TWO_TURNS] * 4)
    ds = PreparedDataset(folder)
    tok = ds.tokenizer
    u, a, e = (tok.token_id(t) for t in (USER, ASSISTANT, END_OF_TURN))
    expected = ([u, *b"hi", e, a, *b"yo", e, u, *b"more", e, a, *b"ok!", e, 256],
                [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0])
    for split in ("train", "val"):
        tokens = np.asarray(ds.tokens(split)).tolist()
        mask = np.asarray(ds.loss_mask(split)).tolist()
        offsets = np.asarray(ds.conversation_offsets(split)).tolist()
        for lo, hi in zip(offsets, offsets[1:], strict=False):
            assert (tokens[lo:hi], mask[lo:hi]) == expected
    targets = [t for t, m in zip(tokens, mask, strict=True) if m]
    assert tok.decode(targets[:7]) == "yo<|endofturn|>ok!<|endofturn|>"


def test_malformed_rows_are_reported_by_line_and_nothing_is_left(tmp_path):
    rows = [TWO_TURNS, "{not json", {"messages": [{"role": "user", "content": "x"}]},
            {"messages": [{"role": "bot", "content": "x"}]}, {"text": "plain"}]
    with pytest.raises(LlmctlError) as err:
        _prepare(tmp_path, rows)
    text = str(err.value)
    assert "4 malformed chat row(s)" in text
    for line, what in ((2, "not JSON"), (3, "no assistant"), (4, "'bot'"), (5, "no 'messages'")):
        assert f"line {line}: " in text and what in text.split(f"line {line}: ")[1].split("\n")[0]
    assert not (tmp_path / "data" / "chat").exists()
    assert not list((tmp_path / "data").glob(".chat*"))


def test_a_row_longer_than_the_record_limit_is_reported_not_held(tmp_path, monkeypatch):
    from llmctl.data import chat

    monkeypatch.setattr(chat, "JSONL_RECORD_LIMIT", 1000)
    long_row = {"messages": [{"role": "user", "content": "a" * 5000},
                             {"role": "assistant", "content": "b"}]}
    with pytest.raises(LlmctlError, match="line 2: longer than 1,000 characters"):
        _prepare(tmp_path, [TWO_TURNS, long_row, TWO_TURNS])


def test_batches_hold_whole_conversations_from_their_start(tmp_path):
    folder = _prepare(tmp_path, [TWO_TURNS, SHAREGPT] * 4)
    ds = PreparedDataset(folder)
    sampler = ds.random_batches("train", 4, 32, seed=3)
    assert isinstance(sampler, ChatBatchSampler)
    picked = sampler.conversations()
    x, y = sampler.next_batch()
    tokens = np.asarray(ds.tokens("train"), dtype=np.int64)
    mask = np.asarray(ds.loss_mask("train"))
    offsets = np.asarray(ds.conversation_offsets("train"))
    for row, c in enumerate(picked):
        lo, hi = int(offsets[c]), int(offsets[c + 1])
        n = min(hi - lo, 33) - 1
        assert x[row, :n].tolist() == tokens[lo:lo + n].tolist()
        assert (x[row, n:] == ds.eot_id).all() and (y[row, n:] == -1).all()  # padding
        want = np.where(mask[lo + 1:lo + n + 1] == 1, tokens[lo + 1:lo + n + 1], -1)
        assert y[row, :n].tolist() == want.tolist()
    # resumable like the window sampler
    state = sampler.state_dict()
    again = ds.random_batches("train", 4, 32, seed=99)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch()[0], sampler.next_batch()[0])


def test_masked_loss_equals_a_hand_computation_on_a_two_turn_conversation(tmp_path):
    from llmctl.config import load_config
    from llmctl.model import LLM

    folder = _prepare(tmp_path, [TWO_TURNS] * 2)
    ds = PreparedDataset(folder)
    sampler = ds.random_batches("train", 1, 24, seed=0)
    x, y = sampler.next_batch()  # (1, 24): 20 inputs of the conversation, then padding
    torch.manual_seed(0)
    model = LLM(load_config(overrides={"n_layer": 1, "n_embd": 16, "n_head": 2,
                                       "n_kv_heads": 2, "up_dim": 32, "block_size": 24,
                                       "vocab_size": 264, "batch_size": 1,
                                       "total_batch_size": 24}).model).eval()
    with torch.no_grad():
        out = model(x, targets=y)
        logits = model(x, use_cache=False).logits[0]  # (24, V)
    tok = ds.tokenizer
    ids = np.asarray(ds.tokens("train"))[:20].tolist()
    assert tok.decode(ids) == ("<|user|>hi<|endofturn|><|assistant|>yo<|endofturn|><|user|>"
                               "more<|endofturn|><|assistant|>ok!<|endofturn|><|endoftext|>")
    # by hand: position t predicts ids[t + 1]; the targets are "yo", "ok!" and their
    # end-of-turn tokens (ids 5-7 and 15-18), nothing of the user's, no role token
    positions = [4, 5, 6, 14, 15, 16, 17]
    assert tok.decode(ids[t + 1] for t in positions) == "yo<|endofturn|>ok!<|endofturn|>"
    logp = F.log_softmax(logits.double(), dim=-1)
    hand = -sum(logp[t, ids[t + 1]] for t in positions) / len(positions)
    assert out.loss.item() == pytest.approx(hand.item(), abs=1e-5)
    assert (y[0] != -1).nonzero().flatten().tolist() == positions
