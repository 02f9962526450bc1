"""Exported tokenizers give llmctl's ids and text back (char, byte, GPT-2 tiktoken)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.  Ünïcödé → ok?\t<|x|>"


def _roundtrip(tok, tmp_path, text: str) -> None:
    from transformers import AutoTokenizer

    from llmctl.interop.tokenizer import hf_tokenizer

    hf_tokenizer(tok).save_pretrained(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(tmp_path / "tok")
    ids = tok.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(ids) == tok.decode(ids)
    assert hf.eos_token_id == tok.eot_id
    assert hf.convert_tokens_to_ids("<|endoftext|>") == tok.eot_id


def test_char_tokenizer(tmp_path):
    from llmctl.data.tokenizers import CharTokenizer

    text = TEXT.encode("ascii", "ignore").decode()
    _roundtrip(CharTokenizer("".join(sorted(set(text)))), tmp_path, text)


def test_byte_tokenizer(tmp_path):
    from llmctl.data.tokenizers import ByteTokenizer

    _roundtrip(ByteTokenizer(), tmp_path, TEXT)


def test_gpt2_tiktoken_tokenizer(tmp_path, gpt2_tiktoken, monkeypatch):
    from llmctl.data.tokenizers import create_tokenizer

    monkeypatch.setenv("LLMCTL_TIKTOKEN_FILE", str(gpt2_tiktoken))
    _roundtrip(create_tokenizer("gpt2"), tmp_path, TEXT)
