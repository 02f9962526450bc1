"""Tokenizers: GPT-2 from a local rank file equals tiktoken's own, specs rebuild exactly."""

from __future__ import annotations

import base64
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from llmctl.core.errors import LlmctlError
from llmctl.data.tokenizers import (
    RANK_FILE,
    TIKTOKEN_FILE_ENV,
    ByteTokenizer,
    CharTokenizer,
    create_tokenizer,
    tokenizer_files,
    tokenizer_from_spec,
)

TRICKY = ("Hello world!  It's 2024...\n\n\tTabs,   spaces \n and <|endoftext|> as plain text;"
          " café, naïve, 東京, emoji 🙂, numbers 1234567 and 3.14159\r\n'll 've 're\n")


def test_gpt2_rank_file_matches_tiktoken(gpt2_tiktoken, reference_gpt2, shakespeare_txt):
    ours = create_tokenizer(None, gpt2_tiktoken)
    assert ours.spec["name"] == "gpt2"
    assert (ours.vocab_size, ours.eot_id) == (50257, 50256)
    assert ours.spec["special_tokens"] == {"<|endoftext|>": 50256}
    text = shakespeare_txt.read_text(encoding="utf-8")
    expected = reference_gpt2.encode_ordinary(text)
    assert ours.encode(text) == expected
    np.testing.assert_array_equal(ours.encode_array(text), expected)
    # Special-token strings in the text are ordinary text, exactly as encode_ordinary does.
    assert ours.encode(TRICKY) == reference_gpt2.encode_ordinary(TRICKY)
    assert ours.encode_array(TRICKY).tolist() == reference_gpt2.encode_ordinary(TRICKY)
    assert 50256 not in ours.encode(TRICKY)
    assert ours.decode(ours.encode(TRICKY)) == TRICKY


def test_tiktoken_by_name_records_its_ranks(r50k_cache, tmp_path):
    """An encoding fetched by name (here from tiktoken's cache) is written out whole."""
    tok = create_tokenizer("r50k_base")
    assert tok.spec["file"] == RANK_FILE
    # The dump is byte-identical to OpenAI's published r50k_base.tiktoken.
    assert tok.spec["sha256"] == "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
    tok.save_files(tmp_path)
    rebuilt = tokenizer_from_spec(json.loads(json.dumps(tok.spec)), tmp_path)
    assert rebuilt.encode(TRICKY) == tok.encode(TRICKY)


def test_spec_rebuilds_from_dataset_and_checkpoint_folders(gpt2_tiktoken, tmp_path):
    tok = create_tokenizer("gpt2", gpt2_tiktoken)
    dataset, checkpoint = tmp_path / "dataset", tmp_path / "checkpoint"
    dataset.mkdir()
    checkpoint.mkdir()
    tok.save_files(dataset)
    spec = json.loads(json.dumps(tok.spec))  # as stored in meta.json
    assert tokenizer_files(spec) == [RANK_FILE]
    for name in tokenizer_files(spec):  # what the trainer does for a checkpoint
        shutil.copy(dataset / name, checkpoint / name)
    for folder in (dataset, checkpoint):
        rebuilt = tokenizer_from_spec(spec, folder)
        assert rebuilt.spec == tok.spec
        assert rebuilt.encode(TRICKY) == tok.encode(TRICKY)
        assert rebuilt.eot_id == 50256


def test_changed_or_missing_rank_file_is_refused(gpt2_tiktoken, tmp_path):
    small = tmp_path / "small.tiktoken"
    small.write_bytes(b"".join(base64.b64encode(bytes([i])) + b" %d\n" % i for i in range(256)))
    custom = create_tokenizer(None, small)
    with pytest.raises(LlmctlError, match="is missing"):
        tokenizer_from_spec(custom.spec, tmp_path / "elsewhere")
    tok = create_tokenizer(None, gpt2_tiktoken)
    # GPT-2's own ranks are built in: a missing copy is no loss (same sha256, same tokens)
    rebuilt = tokenizer_from_spec(tok.spec, tmp_path / "elsewhere")
    assert rebuilt.spec == tok.spec and rebuilt.encode(TRICKY) == tok.encode(TRICKY)
    tok.save_files(tmp_path)
    path = tmp_path / RANK_FILE
    path.write_bytes(path.read_bytes().replace(b"IQ== 0", b"IQ== 9", 1))
    with pytest.raises(LlmctlError, match="sha256"):
        tokenizer_from_spec(tok.spec, tmp_path)


def test_env_rank_file_serves_bare_names(gpt2_tiktoken, reference_gpt2, monkeypatch):
    monkeypatch.setenv(TIKTOKEN_FILE_ENV, str(gpt2_tiktoken))
    tok = tokenizer_from_spec({"kind": "tiktoken", "name": "gpt2"})
    assert tok.encode(TRICKY) == reference_gpt2.encode_ordinary(TRICKY)
    assert create_tokenizer().spec["sha256"] == tok.spec["sha256"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_download_names_what_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty: tiktoken must download
    monkeypatch.delenv(TIKTOKEN_FILE_ENV, raising=False)
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    proxy = f"http://127.0.0.1:{_closed_port()}"  # every request is refused, network or not
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, proxy)
    with pytest.raises(LlmctlError) as err:
        create_tokenizer("cl100k_base")
    message = str(err.value)
    assert "openaipublic.blob.core.windows.net" in message
    assert "--tokenizer_file PATH/cl100k_base.tiktoken" in message
    assert TIKTOKEN_FILE_ENV in message
    # gpt2, the default, is built in: the same offline machine has it
    for tok in (create_tokenizer("gpt2"), create_tokenizer(),
                tokenizer_from_spec({"kind": "tiktoken", "name": "gpt2"})):
        assert tok.spec["name"] == "gpt2" and tok.encode("Hello world") == [15496, 995]


# ---------------------------------------------------------------- the embedded copies


def test_embedded_shakespeare_is_the_reference_file(shared_shakespeare_txt):
    from llmctl.data.embedded import shakespeare_bytes

    data = shakespeare_bytes()
    assert data == shared_shakespeare_txt.read_bytes()
    assert len(data.decode("utf-8")) == 1_115_394


def test_embedded_gpt2_ranks_are_the_reference_ranks(shared_gpt2_tiktoken):
    from tiktoken.load import load_tiktoken_bpe

    from llmctl.data.embedded import gpt2_rank_bytes
    from llmctl.data.tokenizers import parse_ranks

    reference = load_tiktoken_bpe(str(shared_gpt2_tiktoken))
    assert parse_ranks(gpt2_rank_bytes(), "embedded") == reference
    assert create_tokenizer("gpt2").encoding._mergeable_ranks == reference


def test_embedded_gpt2_encodes_shakespeare_as_tiktoken(shared_gpt2_tiktoken,
                                                       shared_shakespeare_txt):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext import openai_public

    reference = tiktoken.Encoding(
        name="gpt2", pat_str=openai_public.r50k_pat_str,
        mergeable_ranks=load_tiktoken_bpe(str(shared_gpt2_tiktoken)),
        special_tokens={openai_public.ENDOFTEXT: 50256}, explicit_n_vocab=50257)
    ours = create_tokenizer("gpt2")
    assert ours.spec["pat_str"] == openai_public.r50k_pat_str
    assert ours.spec["special_tokens"] == {openai_public.ENDOFTEXT: 50256}
    assert (ours.vocab_size, ours.eot_id) == (reference.n_vocab, reference.eot_token)
    text = shared_shakespeare_txt.read_text(encoding="utf-8")
    expected = reference.encode_ordinary(text)
    assert len(expected) > 300_000
    np.testing.assert_array_equal(ours.encode_array(text), expected)
    assert ours.encode(TRICKY) == reference.encode_ordinary(TRICKY)
    assert ours.decode(expected) == text


def test_unknown_tokenizer_lists_choices():
    with pytest.raises(LlmctlError, match=r"did you mean 'gpt2'.*") as err:
        create_tokenizer("gpt-2")
    assert "char" in str(err.value) and "byte" in str(err.value)


def test_char_tokenizer_round_trips():
    texts = ["hello\nworld", "café 🙂 ", "zz"]
    tok = CharTokenizer.fit(texts)
    assert tok.chars == "".join(sorted(set("".join(texts))))
    assert (tok.vocab_size, tok.eot_id) == (len(tok.chars) + 1, len(tok.chars))
    for text in texts:
        ids = tok.encode(text)
        assert ids == [tok.chars.index(c) for c in text]
        assert tok.decode(ids) == text
    rebuilt = tokenizer_from_spec(json.loads(json.dumps(tok.spec)))
    assert rebuilt.encode("café") == tok.encode("café")
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"
    with pytest.raises(LlmctlError, match="outside the char vocabulary: 'Q'"):
        tok.encode("Qz")


def test_byte_tokenizer_is_utf8():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    assert tok.encode(TRICKY) == list(TRICKY.encode("utf-8"))
    assert tok.decode(tok.encode(TRICKY)) == TRICKY
    assert tok.decode([104, 105, 256]) == "hi<|endoftext|>"
    assert tok.encode("a\ud800b") == list("a\ufffdb".encode())  # a lone surrogate


def _custom_rank_file(path: Path, high: int = 0) -> Path:
    """256 single bytes, then a few merges (optionally pushed to ids above `high`)."""
    ranks = {bytes([b]): b for b in range(256)}
    for i, token in enumerate([b"th", b"he", b"the", b" t", b" the", b"in", b"ing"]):
        ranks[token] = max(256, high) + i
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    return path


def test_custom_rank_file_gets_gpt2_pattern_and_eot_after_ranks(tmp_path):
    tok = create_tokenizer(None, _custom_rank_file(tmp_path / "tiny.tiktoken"))
    assert tok.spec["name"] == "tiny"
    assert tok.eot_id == 256 + 7 and tok.vocab_size == 256 + 8
    ids = tok.encode("the thing")
    assert tok.decode(ids) == "the thing"
    assert 256 + 2 in ids  # "the" merged
    tok.save_files(tmp_path)
    assert tokenizer_from_spec(tok.spec, tmp_path).encode("the thing") == ids


def test_bad_rank_files_and_flag_mixes_are_clear(tmp_path, gpt2_tiktoken):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot base64!! x\n")
    with pytest.raises(LlmctlError, match="line 2"):
        create_tokenizer(None, bad)
    with pytest.raises(LlmctlError, match="absent.tiktoken does not exist"):
        create_tokenizer(None, tmp_path / "absent.tiktoken")
    with pytest.raises(LlmctlError, match="is a character device"):  # never read whole
        create_tokenizer(None, "/dev/zero")
    with pytest.raises(LlmctlError, match="not --tokenizer byte"):
        create_tokenizer("byte", gpt2_tiktoken)
    with pytest.raises(LlmctlError, match="holds the ranks of gpt2"):
        create_tokenizer("cl100k_base", gpt2_tiktoken)
    with pytest.raises(LlmctlError, match="kind"):
        tokenizer_from_spec({"kind": "sentencepiece"})


def test_decode_tolerates_ids_outside_the_vocabulary(gpt2_tiktoken):
    tok = create_tokenizer(None, gpt2_tiktoken)
    hello = tok.encode("hello")
    assert tok.decode([*hello, 50300, *hello]) == "hello\ufffdhello"
    assert CharTokenizer("ab").decode([0, 7, 1]) == "a\ufffdb"
