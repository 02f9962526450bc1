"""Cutting text into pieces, batching documents, and the worker pool."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

from llmctl.data.pipeline import TokenizerPool, WorkItem, batch_pieces, encode_item
from llmctl.data.sources.text import safe_cut, text_file_pieces
from llmctl.data.tokenizers import ByteTokenizer, create_tokenizer

# Whitespace runs, trailing spaces, blank lines, CRLF, digits and punctuation at line starts:
# the places where a careless cut changes how GPT-2's pattern splits the text.
TRICKY_LINES = [
    "First line  \n", "\n", "\n", "  indented line\n", "12345 numbers\n", "...dots\n",
    "'s contraction\n", "x\r\n", "Word\n", "  \n", "tail spaces   \n", "Ünïcödé\n", "/slash\n",
    "end.\n", "a\n", "b\n", "Windows line\r\n", "two  spaces between words\n",
    "it's don't we'll\n", "mixed 東京 and café words\n",
]
# Random text over an alphabet of letters, digits, spaces, newlines and punctuation.
FUZZ_ALPHABET = list("abcXYZé東 \n\r\t'.,/1234567890-🙂") + ["  ", "\n\n", " the", "'s"]


@pytest.fixture(scope="module")
def gpt2(gpt2_tiktoken):
    return create_tokenizer(None, gpt2_tiktoken)


def test_safe_cuts_never_change_gpt2_tokens(gpt2, shakespeare_txt, tmp_path):
    rng = np.random.default_rng(0)
    tricky = "".join(rng.choice(TRICKY_LINES, size=4000))
    fuzz = "".join(rng.choice(FUZZ_ALPHABET, size=100_000))
    for text in (shakespeare_txt.read_text(encoding="utf-8")[:200_000], tricky, fuzz):
        path = tmp_path / "corpus.txt"
        path.write_bytes(text.encode("utf-8"))
        pieces = list(text_file_pieces(path, piece_chars=3000))
        assert len(pieces) > 5
        assert "".join(p[0] for p in pieces) == text
        assert [p[1] for p in pieces] == [False] * (len(pieces) - 1) + [True]
        assert sum(p[2] for p in pieces) == len(text.encode("utf-8"))  # bytes, for progress
        joined = np.concatenate([gpt2.encode_array(p[0]) for p in pieces])
        np.testing.assert_array_equal(joined, gpt2.encode_array(text))


def test_safe_cut_rules(gpt2):
    # Why cuts must be chosen: cutting inside a whitespace run changes GPT-2's tokens.
    assert gpt2.encode("hello  ") + gpt2.encode("world") != gpt2.encode("hello  world")
    assert safe_cut("ab\ncd", 5) == 3  # after a newline between non-space and a letter
    assert safe_cut("ab cd", 5) == 2  # before a single space between letters
    assert safe_cut("ab \ncd", 6) == 0  # trailing whitespace joins the newline's piece
    assert safe_cut("ab\n cd", 6) == 0  # leading space would join the newline's piece
    assert safe_cut("ab\n\ncd", 6) == 0  # "\n\n" is one piece
    assert safe_cut("ab  cd", 6) == 0  # inside a whitespace run
    assert safe_cut("x\r\nY", 4) == 0  # cl100k keeps "\r\n" together
    assert safe_cut("12 34", 5) == 0  # digits group in threes
    assert safe_cut("a.\n/x\nyz", 8) == 6  # not before "/" (o200k's pattern takes it)


def test_batches_put_end_of_text_after_each_document():
    pieces = [("doc one, part 1 ", False, 1.0), ("part 2", True, 1.0), ("", True, 1.0),
              ("second", True, 1.0), ("", False, 0.0), ("", True, 1.0)]
    items = list(batch_pieces(iter(pieces), lambda: "train", target_chars=10_000))
    assert len(items) == 1 and items[0].split == "train" and items[0].units == 5.0
    tokens = encode_item(ByteTokenizer(), items[0].texts, items[0].eots, "uint16")
    expected = list(b"doc one, part 1 part 2") + [256] + list(b"second") + [256]
    assert tokens.tolist() == expected  # empty documents add no end-of-text
    assert tokens.dtype == np.dtype("<u2")


def test_batches_follow_the_route_per_document():
    splits = iter(["val", "train", "train", "val"])
    docs = [(f"d{i}", True, 1.0) for i in range(4)]
    items = list(batch_pieces(iter(docs), lambda: next(splits)))
    assert [(it.split, it.texts) for it in items] == [
        ("val", ["d0"]), ("train", ["d1", "d2"]), ("val", ["d3"])]


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_pool_of_processes_matches_in_process(gpt2, shakespeare_txt, tmp_path, start_method):
    if start_method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {start_method} here")
    gpt2.save_files(tmp_path)  # spawned workers rebuild the tokenizer from the folder
    text = shakespeare_txt.read_text(encoding="utf-8")[:300_000]
    chunks = [text[i:i + 20_000] for i in range(0, len(text), 20_000)]

    def items():
        for i, chunk in enumerate(chunks):
            yield WorkItem("train", [chunk], [i % 3 == 2], 1.0)
    with TokenizerPool(gpt2, tmp_path, "uint16", num_proc=1) as pool:
        serial = [tokens for _, tokens in pool.map(items())]
    with TokenizerPool(gpt2, tmp_path, "uint16", num_proc=2, start_method=start_method) as pool:
        parallel = [(item.units, tokens) for item, tokens in pool.map(items())]
        assert pool._executor is not None  # really ran in worker processes
        assert pool.start_method == start_method
    assert len(parallel) == len(serial) == len(chunks)
    for (units, got), want in zip(parallel, serial, strict=True):
        assert units == 1.0
        np.testing.assert_array_equal(got, want)
