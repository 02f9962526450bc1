"""The trained byte-level BPE: deterministic, trained on the training split only, lossless."""

from __future__ import annotations

import random

import numpy as np
import pytest

from llmctl.core.errors import LlmctlError
from llmctl.data.bpe import BPETokenizer, train_bpe
from llmctl.data.prepare import PrepareOptions, prepare_dataset
from llmctl.data.tokenizers import EOT_TEXT, same_tokenizer, tokenizer_from_spec

VAL_WORD = "Zorbquaxilent"


def _prepare(tmp_path, corpus: str, name: str, vocab: int = 400, **kwargs):
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = tmp_path / f"{name}.txt"
    source.write_text(corpus, encoding="utf-8")
    return prepare_dataset(PrepareOptions(source=str(source), name=name,
                                          data_dir=tmp_path / "data", tokenizer="bpe",
                                          bpe_vocab=vocab, progress=False, num_proc=1,
                                          **kwargs))


def _corpus(shakespeare_txt) -> str:
    # the last tenth (the validation split) repeats a word that occurs nowhere else
    train = shakespeare_txt.read_text(encoding="utf-8")[:45_000]
    val = " ".join(f"{VAL_WORD} said so." for _ in range(500))
    return train + "\n" + val


def test_training_twice_gives_identical_files(tmp_path, shakespeare_txt):
    corpus = shakespeare_txt.read_text(encoding="utf-8")[:30_000]
    a = _prepare(tmp_path / "a", corpus, "x")
    b = _prepare(tmp_path / "b", corpus, "x")
    for name in ("tokenizer.json", "train.bin", "val.bin"):
        assert (a.folder / name).read_bytes() == (b.folder / name).read_bytes(), name
    assert a.meta["tokenizer"] == b.meta["tokenizer"]
    assert a.meta["tokenizer"]["kind"] == "bpe" and a.meta["vocab_size"] == 400


def test_no_validation_text_reaches_the_trainer(tmp_path, shakespeare_txt):
    corpus = _corpus(shakespeare_txt)
    result = _prepare(tmp_path, corpus, "split", val_fraction=0.25)  # cut before the word
    tok = tokenizer_from_spec(result.meta["tokenizer"], result.folder)
    assert len(tok.encode(" " + VAL_WORD)) > 1  # never seen: not merged into one token
    # the control: the same training with the validation text included merges it
    with_val = train_bpe(iter([corpus]), 400)
    assert len(with_val.encode(" " + VAL_WORD)) == 1
    # the split starts where the tokenizer's training text ended: val holds the word
    val = tok.decode(np.fromfile(result.folder / "val.bin", dtype="uint16"))
    train = tok.decode(np.fromfile(result.folder / "train.bin", dtype="uint16"))
    assert VAL_WORD in val and VAL_WORD not in train
    assert train + val == corpus + EOT_TEXT  # nothing lost or repeated at the cut
    comp = result.meta["compression"]
    assert comp["text"] == "validation" and comp["bpe"] > 1


def test_round_trips_arbitrary_utf8_and_keeps_special_strings_as_text(shakespeare_txt):
    tok = train_bpe(iter([shakespeare_txt.read_text(encoding="utf-8")[:20_000]]), 300)
    rng = random.Random(0)
    alphabet = "aé漢字🙂\n\t  ÿ\x00\u200dЖ" + "".join(chr(rng.randrange(0x20, 0x2FFFF))
                                                    for _ in range(200))
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        text = text.encode("utf-8", "ignore").decode("utf-8")  # drop lone surrogates
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(f"a{EOT_TEXT}b")
    assert tok.eot_id not in ids and tok.decode(ids) == f"a{EOT_TEXT}b"
    assert tok.decode([tok.eot_id]) == EOT_TEXT


def test_spec_rebuilds_and_rejects_a_changed_file(tmp_path, shakespeare_txt):
    result = _prepare(tmp_path, shakespeare_txt.read_text(encoding="utf-8")[:20_000], "s")
    spec = result.meta["tokenizer"]
    tok = tokenizer_from_spec(spec, result.folder)
    assert isinstance(tok, BPETokenizer) and same_tokenizer(spec, tok.spec)
    path = result.folder / "tokenizer.json"
    path.write_bytes(path.read_bytes().replace(b'"merges"', b'"merges" '))
    with pytest.raises(LlmctlError, match="sha256"):
        tokenizer_from_spec(spec, result.folder)
    with pytest.raises(LlmctlError, match="bpe_vocab"):
        train_bpe(iter(["abc"]), 100)


def test_a_tokenizer_file_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    """The file a bpe spec names is read with the bound every user file gets: a FIFO in
    its place is refused at once instead of blocking the read."""
    import os

    os.mkfifo(tmp_path / "tokenizer.json")
    with pytest.raises(LlmctlError, match="not a regular file"):
        tokenizer_from_spec({"kind": "bpe", "file": "tokenizer.json"}, tmp_path)
