"""prepare: sources -> DATA_DIR/NAME, checked token for token against tiktoken."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from llmctl.core.errors import LlmctlError
from llmctl.data import layout
from llmctl.data.prepare import SHAKESPEARE_URL_ENV, PrepareOptions, prepare_dataset


def _tokens(folder: Path, split: str) -> np.ndarray:
    meta = json.loads((folder / "meta.json").read_text())
    return np.fromfile(folder / meta["splits"][split]["file"],
                       dtype=np.dtype(meta["dtype"]).newbyteorder("<"))


def _options(data_dir: Path, **kwargs) -> PrepareOptions:
    return PrepareOptions(data_dir=data_dir, progress=False, num_proc=1, **kwargs)


def test_shakespeare_download_tokenizes_like_tiktoken(
        http_server, shakespeare_txt, gpt2_tiktoken, reference_gpt2, tmp_path, monkeypatch):
    base, served = http_server
    (served / "input.txt").write_bytes(shakespeare_txt.read_bytes())
    monkeypatch.setenv(SHAKESPEARE_URL_ENV, f"{base}/input.txt")
    data_dir = tmp_path / "data"
    result = prepare_dataset(_options(data_dir, dataset="shakespeare",
                                      tokenizer_file=gpt2_tiktoken))
    folder = data_dir / "shakespeare"
    assert result.folder == folder and not result.skipped
    expected = reference_gpt2.encode_ordinary(shakespeare_txt.read_text(encoding="utf-8"))
    expected.append(50256)  # the one document ends with end-of-text
    n_train = int(len(expected) * 0.9)
    train, val = _tokens(folder, "train"), _tokens(folder, "val")
    assert train.tolist() == expected[:n_train] and val.tolist() == expected[n_train:]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta == result.meta
    assert meta["format"] == layout.FORMAT_VERSION and meta["dataset"] == "shakespeare"
    assert meta["source"] == f"{base}/input.txt"
    assert (meta["vocab_size"], meta["eot_id"], meta["dtype"]) == (50257, 50256, "uint16")
    assert meta["max_token_id"] == max(expected)
    assert meta["splits"]["train"] == {"file": "train.bin", "tokens": n_train,
                                       "sha256": layout.sha256_file(folder / "train.bin")}
    assert meta["splits"]["val"]["tokens"] == len(expected) - n_train
    assert meta["splits"]["val"]["sha256"] == layout.sha256_file(folder / "val.bin")
    # The rank file travels with the dataset, so nothing needs the network afterwards.
    assert (folder / "tokenizer.tiktoken").read_bytes() == gpt2_tiktoken.read_bytes()
    assert meta["checksums"]["tokenizer.tiktoken"] == meta["tokenizer"]["sha256"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "meta.json", "tokenizer.tiktoken", "train.bin", "val.bin"]


def test_download_failures_name_the_url_and_the_way_out(
        http_server, refused_url, gpt2_tiktoken, tmp_path, monkeypatch, leftovers):
    base, _ = http_server
    data_dir = tmp_path / "data"
    for url, reason in ((f"{base}/missing.txt", "HTTP 404"), (refused_url, "could not reach")):
        monkeypatch.setenv(SHAKESPEARE_URL_ENV, url)
        with pytest.raises(LlmctlError) as err:
            prepare_dataset(_options(data_dir, dataset="shakespeare",
                                     tokenizer_file=gpt2_tiktoken))
        message = str(err.value)
        assert reason in message and url in message and "Tiny Shakespeare" in message
        assert "--source PATH" in message
        assert leftovers(data_dir) == []  # no dataset, no partial folder, no lock
        assert list((data_dir / ".downloads").iterdir()) == []


def test_char_tokenizer_is_nanogpt_shakespeare_char(shakespeare_txt, tmp_path):
    text = shakespeare_txt.read_text(encoding="utf-8")
    result = prepare_dataset(_options(tmp_path, dataset="shakespeare", source=str(shakespeare_txt),
                                      tokenizer="char"))
    meta = result.meta
    chars = "".join(sorted(set(text)))
    assert len(chars) == 65 and meta["tokenizer"] == {"kind": "char", "chars": chars}
    assert (meta["vocab_size"], meta["eot_id"]) == (66, 65)
    tokens = np.concatenate([_tokens(result.folder, "train"), _tokens(result.folder, "val")])
    assert "".join(chars[i] for i in tokens[:-1]) == text and tokens[-1] == 65
    assert meta["source"] == str(shakespeare_txt)


def test_structured_local_sources_one_document_per_row(gpt2_tiktoken, reference_gpt2, tmp_path,
                                                       write_parquet):
    folder = tmp_path / "corpus"
    rows_a = [{"text": f"JSON line document {i}.\nWith two lines.", "n": i} for i in range(30)]
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_a))
    texts_b = [f"Parquet document {i}, with café and {i * 7}" for i in range(30)] + [None, ""]
    write_parquet(folder / "b.parquet", texts_b)
    (folder / "c.txt").write_text("A plain text file is one document.\n")
    result = prepare_dataset(_options(tmp_path / "data", source=str(folder), name="mix",
                                      tokenizer_file=gpt2_tiktoken))
    docs = [r["text"] for r in rows_a] + [t for t in texts_b if t] + [
        "A plain text file is one document.\n"]
    expected = [t for doc in docs for t in [*reference_gpt2.encode_ordinary(doc), 50256]]
    got = np.concatenate([_tokens(result.folder, "train"), _tokens(result.folder, "val")])
    assert got.tolist() == expected
    assert result.meta["dataset"] == "mix" and result.meta["split_policy"] == "tail"


def test_hub_dataset_from_local_parquet_copy(gpt2_tiktoken, reference_gpt2, tmp_path,
                                             write_parquet):
    """tinystories through the same datasets code as the hub, pointed at a local copy."""
    copy = tmp_path / "TinyStories"
    train = [f"Once upon a time there was a robot number {i}." for i in range(40)]
    val = [f"The end of story {i}." for i in range(5)]
    write_parquet(copy / "data" / "train-00000-of-00001.parquet", train)
    write_parquet(copy / "data" / "validation-00000-of-00001.parquet", val)
    hashes = []
    for streaming in (False, True):
        result = prepare_dataset(_options(
            tmp_path / f"data-{streaming}", dataset="tinystories", source=str(copy),
            tokenizer_file=gpt2_tiktoken, streaming=streaming, cache_dir=tmp_path / "hf"))
        for split, texts in (("train", train), ("val", val)):
            expected = [t for doc in texts for t in [*reference_gpt2.encode_ordinary(doc), 50256]]
            assert _tokens(result.folder, split).tolist() == expected
        assert result.meta["split_policy"] == "own"
        hashes.append(result.meta["checksums"])
    assert hashes[0] == hashes[1]


def test_wikitext_rows_become_articles(tmp_path, write_parquet):
    rows = ["", " = Alpha = \n", "", " Alpha text .\n", " = = Section = = \n", " More .\n", "",
            " = Beta = \n", "", " Beta text .\n"]
    copy = tmp_path / "wikitext"
    write_parquet(copy / "wikitext-2-raw-v1" / "train-00000-of-00001.parquet", rows)
    write_parquet(copy / "wikitext-2-raw-v1" / "validation-00000-of-00001.parquet", rows[7:])
    result = prepare_dataset(_options(tmp_path / "data", dataset="wikitext", source=str(copy),
                                      subset="wikitext-2-raw-v1", tokenizer="byte",
                                      cache_dir=tmp_path / "hf"))
    train = _tokens(result.folder, "train").tolist()
    articles = ["".join(rows[:7]), "".join(rows[7:])]
    assert train == [t for a in articles for t in [*a.encode(), 256]]
    assert _tokens(result.folder, "val").tolist() == [*articles[1].encode(), 256]


def test_fineweb_holds_out_seeded_documents_and_caps_tokens(tmp_path, write_parquet):
    copy = tmp_path / "fineweb"
    docs = [f"Document {i}: " + "educational text " * (i % 7 + 1) for i in range(300)]
    write_parquet(copy / "sample" / "10BT" / "000_00000.parquet", docs)
    runs = {}
    for name, seed, cap in (("a", 1, 4000), ("b", 1, 4000), ("c", 2, 4000), ("full", 1, None)):
        result = prepare_dataset(_options(tmp_path / "data", dataset="fineweb", source=str(copy),
                                          name=name, seed=seed, max_tokens=cap, val_fraction=0.2,
                                          tokenizer="byte"))
        meta = result.meta
        assert meta["split_policy"] == "heldout"
        train, val = _tokens(result.folder, "train"), _tokens(result.folder, "val")
        total = len(train) + len(val)
        assert total == (cap or sum(len(d.encode()) + 1 for d in docs))
        assert 0 < len(val) < len(train)
        runs[name] = (meta["checksums"]["train.bin"], meta["checksums"]["val.bin"])
        if cap is None:  # every document lands whole in exactly one split
            def split_docs(tokens):
                ends = np.where(tokens == 256)[0] + 1
                return [bytes(d[:-1].astype(np.uint8)).decode()
                        for d in np.split(tokens, ends)[:-1]]
            got = split_docs(train) + split_docs(val)
            assert sorted(got) == sorted(docs)
            assert 0.1 < len(split_docs(val)) / len(docs) < 0.3
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]


def test_uint32_when_the_vocabulary_needs_it(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    for i, token in enumerate([b"th", b"he", b"the", b" the"]):
        ranks[token] = 70_000 + i  # ids above uint16
    rank_file = tmp_path / "wide.tiktoken"
    rank_file.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    source = tmp_path / "the.txt"
    source.write_text("the theme of the thesis " * 50)
    result = prepare_dataset(_options(tmp_path / "data", source=str(source),
                                      tokenizer_file=rank_file))
    assert result.meta["dtype"] == "uint32" and result.meta["eot_id"] == 70_004
    tokens = np.concatenate([_tokens(result.folder, "train"), _tokens(result.folder, "val")])
    assert tokens.max() == 70_004 and (tokens == 70_003).sum() > 10
    assert result.meta["max_token_id"] == 70_004


def test_finished_dataset_is_not_redone_unless_forced(shakespeare_txt, tmp_path):
    opts = dict(source=str(shakespeare_txt), name="sh", tokenizer="byte", max_tokens=5000)
    first = prepare_dataset(_options(tmp_path, **opts))
    stamp = (first.folder / "train.bin").stat().st_mtime_ns
    again = prepare_dataset(_options(tmp_path, **opts))
    assert again.skipped and again.meta == first.meta
    assert (first.folder / "train.bin").stat().st_mtime_ns == stamp
    with pytest.raises(LlmctlError, match="already prepared with other settings.*tokenizer"):
        prepare_dataset(_options(tmp_path, **{**opts, "tokenizer": "char"}))
    forced = prepare_dataset(_options(tmp_path, force=True, **{**opts, "tokenizer": "char"}))
    assert not forced.skipped and forced.meta["tokenizer"]["kind"] == "char"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sh"]


def test_damaged_dataset_is_redone_and_foreign_files_are_kept(shakespeare_txt, tmp_path):
    opts = dict(source=str(shakespeare_txt), name="sh", tokenizer="byte", max_tokens=3000)
    folder = prepare_dataset(_options(tmp_path, **opts)).folder
    with open(folder / "train.bin", "r+b") as f:
        f.truncate(100)
    assert not prepare_dataset(_options(tmp_path, **opts)).skipped  # truncated -> redone
    (folder / "notes.txt").write_text("mine")
    (folder / "meta.json").unlink()
    with pytest.raises(LlmctlError, match="notes.txt"):
        prepare_dataset(_options(tmp_path, **opts))
    assert (folder / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("content, message", [
    (b"", "has no text"),
    (b"\xff\xfe\x00bad bytes", "not UTF-8 text"),
])
def test_bad_sources_leave_nothing_behind(tmp_path, content, message, leftovers):
    source = tmp_path / "bad.txt"
    source.write_bytes(content)
    data_dir = tmp_path / "data"
    with pytest.raises(LlmctlError, match=message):
        prepare_dataset(_options(data_dir, source=str(source), tokenizer="byte"))
    assert leftovers(data_dir) == []


def test_empty_heldout_split_is_an_error(tmp_path, write_parquet, leftovers):
    copy = write_parquet(tmp_path / "fineweb" / "train.parquet", ["one doc", "two docs"])
    with pytest.raises(LlmctlError, match="val split .* came out empty.*--val_fraction"):
        prepare_dataset(_options(tmp_path / "data", dataset="fineweb", source=str(copy.parent),
                                 tokenizer="byte"))
    assert leftovers(tmp_path / "data") == []


def test_wrong_text_field_lists_the_fields(tmp_path, write_parquet, leftovers):
    path = write_parquet(tmp_path / "rows.parquet", ["a", "b"], field="content")
    with pytest.raises(LlmctlError, match=r"no field 'text'.*content, id.*--text_field"):
        prepare_dataset(_options(tmp_path / "data", source=str(path), tokenizer="byte"))
    assert leftovers(tmp_path / "data") == []
    result = prepare_dataset(_options(tmp_path / "data", source=str(path), tokenizer="byte",
                                      text_field="content"))
    assert result.meta["splits"]["train"]["tokens"] + result.meta["splits"]["val"]["tokens"] == 4


def test_shakespeare_is_embedded_and_needs_no_download(shakespeare_txt, gpt2_tiktoken,
                                                       reference_gpt2, tmp_path, monkeypatch):
    monkeypatch.delenv(SHAKESPEARE_URL_ENV, raising=False)
    data_dir = tmp_path / "data"
    result = prepare_dataset(_options(data_dir, dataset="shakespeare"))  # gpt2: built in too
    meta = result.meta
    assert meta["source"] == "Tiny Shakespeare (karpathy/char-rnn; embedded in llmctl)"
    assert meta["options"]["source"] == "embedded:tinyshakespeare.txt"
    expected = reference_gpt2.encode_ordinary(shakespeare_txt.read_text(encoding="utf-8"))
    tokens = np.concatenate([_tokens(result.folder, "train"), _tokens(result.folder, "val")])
    assert tokens.tolist() == [*expected, 50256]
    assert (result.folder / "tokenizer.tiktoken").read_bytes() == gpt2_tiktoken.read_bytes()
    assert prepare_dataset(_options(data_dir, dataset="shakespeare")).skipped


def test_every_problem_known_before_starting_is_reported_at_once(refused_url, tmp_path,
                                                                  monkeypatch, leftovers):
    with pytest.raises(LlmctlError) as err:
        prepare_dataset(PrepareOptions(data_dir=tmp_path, progress=False, dataset="shakespeare",
                                       val_fraction=1.5, max_tokens=1, num_proc=0, subset="x"))
    message = str(err.value)
    assert message.startswith("prepare cannot start (4 problems):")
    for part in ("--val_fraction 1.5", "--max_tokens 1", "--num_proc 0", "--subset is for"):
        assert part in message
    # an unusable tokenizer and an unreachable source: both, each with its way out
    monkeypatch.setenv(SHAKESPEARE_URL_ENV, refused_url)
    data_dir = tmp_path / "data"
    with pytest.raises(LlmctlError) as err:
        prepare_dataset(_options(data_dir, dataset="shakespeare",
                                 tokenizer_file=tmp_path / "missing.tiktoken"))
    message = str(err.value)
    assert message.startswith("prepare cannot start (2 problems):")
    assert "missing.tiktoken does not exist" in message
    assert "could not reach" in message and refused_url in message and "--source PATH" in message
    assert leftovers(data_dir) == []


def test_unknown_dataset_and_bad_options(tmp_path):
    with pytest.raises(LlmctlError, match="did you mean 'shakespeare'"):
        prepare_dataset(_options(tmp_path, dataset="shakespear"))
    with pytest.raises(LlmctlError, match="or pass --source"):
        prepare_dataset(_options(tmp_path))
    with pytest.raises(LlmctlError, match="val_fraction"):
        prepare_dataset(_options(tmp_path, dataset="shakespeare", val_fraction=1.5))
    (tmp_path / "x.txt").write_text("some text\n")
    with pytest.raises(LlmctlError, match="plain folder name"):
        prepare_dataset(_options(tmp_path, source=str(tmp_path / "x.txt"), name="../escape"))
    with pytest.raises(LlmctlError, match="wikitext-2-raw-v1"):
        prepare_dataset(_options(tmp_path, dataset="wikitext", subset="wikitext-3"))


def test_download_cache_is_reused(http_server, tmp_path, monkeypatch):
    base, served = http_server
    (served / "input.txt").write_text("To be, or not to be.\n" * 100)
    monkeypatch.setenv(SHAKESPEARE_URL_ENV, f"{base}/input.txt")
    data_dir = tmp_path / "data"
    first = prepare_dataset(_options(data_dir, dataset="shakespeare", tokenizer="byte"))
    (served / "input.txt").unlink()  # the server no longer has it: the cached copy serves
    second = prepare_dataset(_options(data_dir, dataset="shakespeare", tokenizer="char",
                                      name="shakespeare_char"))
    total = sum(e["tokens"] for e in second.meta["splits"].values())
    assert total == sum(e["tokens"] for e in first.meta["splits"].values()) == 2101
    cached = list((data_dir / ".downloads").iterdir())
    assert len(cached) == 1 and hashlib.sha1(f"{base}/input.txt".encode()).hexdigest()[:12] \
        in cached[0].name


def test_any_url_source_goes_through_the_same_readers(http_server, tmp_path):
    base, served = http_server
    rows = [{"body": f"Row number {i} of a remote JSONL file."} for i in range(20)]
    (served / "remote.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = prepare_dataset(_options(tmp_path / "data", source=f"{base}/remote.jsonl",
                                      text_field="body", tokenizer="byte"))
    assert result.folder.name == "remote" and result.meta["source"] == f"{base}/remote.jsonl"
    tokens = np.concatenate([_tokens(result.folder, "train"), _tokens(result.folder, "val")])
    assert tokens.tolist() == [t for r in rows for t in [*r["body"].encode(), 256]]


def test_one_prepare_per_name_at_a_time(shakespeare_txt, tmp_path):
    from llmctl.data.dataset_folder import lock as _lock

    with _lock(tmp_path, "sh"), pytest.raises(LlmctlError, match="another `llmctl prepare`"):
        prepare_dataset(_options(tmp_path, source=str(shakespeare_txt), name="sh",
                                 tokenizer="byte"))
    assert prepare_dataset(_options(tmp_path, source=str(shakespeare_txt), name="sh",
                                    tokenizer="byte", max_tokens=100)).meta


def test_read_only_data_dir_is_a_message_or_the_finished_dataset(shakespeare_txt, tmpfs):
    from typer.testing import CliRunner

    from llmctl.cli import app

    disk = tmpfs.mount("1m")
    corpus = disk / "corpus.txt"
    corpus.write_text(shakespeare_txt.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    args = ["prepare", "--source", str(corpus), "--tokenizer", "char", "--num_proc", "1"]

    def prepare(data_dir, *extra):
        return CliRunner().invoke(app, [*args, "--data_dir", str(data_dir), *extra])

    assert prepare(disk / "data", "--name", "done").exit_code == 0
    tmpfs.read_only(disk)
    # nothing to write: the finished dataset with these settings is simply reported
    again = prepare(disk / "data", "--name", "done")
    assert again.exit_code == 0 and "already prepared" in again.output, again.output
    for where, extra, named in [
            (disk / "data", ("--name", "fresh"), f"cannot write to data_dir {disk / 'data'}"),
            (disk / "data", ("--name", "done", "--force"), f"cannot write to data_dir {disk}"),
            (disk / "new", ("--name", "x"), f"cannot create data_dir {disk / 'new'}")]:
        result = prepare(where, *extra)
        assert result.exit_code == 2, result.output
        assert named in result.output and "Read-only file system" in result.output
        assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert sorted(p.name for p in (disk / "data").iterdir()) == ["done"]
