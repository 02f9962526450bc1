"""A published-style model with its own tokenizer: a tiny Llama whose tokenizer.json is a BPE
trained here with the `tokenizers` library. prepare --tokenizer hf:PATH tokenizes local text
with it, train --init_from hf:PATH fine-tunes the model on that data, and sample / eval of the
run folder use the tokenizer the checkpoint carries (the source folder gone)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmctl.cli import app

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

LINES = ["To be, or not to be, that is the question:",
         "Whether 'tis nobler in the mind to suffer",
         "The slings and arrows of outrageous fortune,",
         "Or to take arms against a sea of troubles"]


def _foreign_folder(folder: Path) -> Path:
    """A transformers folder: a random tiny Llama + a byte-level BPE with Llama's specials."""
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(LINES * 20, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    config = transformers.LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def _refused(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.fixture
def foreign(tmp_path):
    return _foreign_folder(tmp_path / "llama")


@pytest.fixture
def corpus(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(LINES * 40) + "\n", encoding="utf-8")
    return text


def test_prepare_with_a_foreign_tokenizer_gives_transformers_ids(foreign, corpus, tmp_path):
    import numpy as np

    from llmctl.data.layout import read_meta

    data = tmp_path / "data"
    _cli("prepare", "--source", str(corpus), "--name", "mine", "--data_dir", str(data),
         "--tokenizer", f"hf:{foreign}", "--val_fraction", "0.2")
    meta = read_meta(data / "mine")
    sha = hashlib.sha256((foreign / "tokenizer.json").read_bytes()).hexdigest()
    assert meta["tokenizer"] == {"kind": "hf", "file": "tokenizer.json", "sha256": sha,
                                 "eot_token": "</s>", "vocab_size": 300}
    assert meta["eot_id"] == 2
    # the dataset carries its own copy; the ids are transformers' own for the text
    assert (data / "mine" / "tokenizer.json").read_bytes() == \
        (foreign / "tokenizer.json").read_bytes()
    hf = transformers.AutoTokenizer.from_pretrained(foreign)
    tokens = np.fromfile(data / "mine" / "train.bin", dtype=meta["dtype"])
    first = hf.encode(LINES[0], add_special_tokens=False)
    assert tokens[:len(first)].tolist() == first
    # a tokenizer.json file (with its folder's config beside it) is the same tokenizer
    _cli("prepare", "--source", str(corpus), "--name", "mine2", "--data_dir", str(data),
         "--tokenizer", f"hf:{foreign / 'tokenizer.json'}", "--val_fraction", "0.2")
    assert read_meta(data / "mine2")["tokenizer"] == meta["tokenizer"]


def test_fine_tune_a_foreign_model_then_sample_and_eval_without_the_source(
        foreign, corpus, tmp_path):
    from llmctl.infer.evaluate import EvalRequest, evaluate_checkpoint
    from llmctl.infer.load import load_checkpoint
    from llmctl.interop.hf_init import IMPORT_FOLDER

    data, runs = tmp_path / "data", tmp_path / "runs"
    _cli("prepare", "--source", str(corpus), "--name", "mine", "--data_dir", str(data),
         "--tokenizer", f"hf:{foreign}", "--val_fraction", "0.2")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(foreign).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(foreign)
    _cli("train", "--init_from", f"hf:{foreign}", "--dataset", "mine", "--data_dir",
         str(data), "--out_dir", str(runs), "--file_name", "ft", "--max_iters", "1",
         "--batch_size", "2", "--total_batch_size", "64", "--save_model", "--eval_iters", "1",
         "--device", "cpu", "--seed", "5")
    run_dir = runs / "ft"
    imported = load_checkpoint(run_dir / IMPORT_FOLDER, device="cpu")
    assert imported.info.tokenizer["kind"] == "hf"
    # the imported model is transformers' model: same logits on the same ids
    idx = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = imported.model(idx).logits
        theirs = hf_model(idx).logits
    torch.testing.assert_close(ours[:, -1], theirs[:, -1], atol=1e-5, rtol=0)
    # and the first step's loss is its loss on the trainer's first batch
    first = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"][0]["loss"]
    report = evaluate_checkpoint(imported, EvalRequest(
        dataset="mine", data_dir=str(data), split="train", eval_iters=1, batch_size=2, seed=5))
    assert first == pytest.approx(report.loss, abs=1e-5)

    shutil.rmtree(foreign)  # the run folder carries its own tokenizer.json
    assert (run_dir / "latest" / "tokenizer.json").is_file()
    out = json.loads(_cli("sample", str(run_dir), "--prompt", "To be", "--temperature", "0",
                          "--max_new_tokens", "6", "--no_stop_at_eot", "--json",
                          "--device", "cpu"))
    sample = out["samples"][0]
    tok = load_checkpoint(run_dir, device="cpu").tokenizer
    assert out["prompt_tokens"] == len(hf_tokenizer.encode("To be", add_special_tokens=False))
    assert len(sample["token_ids"]) == 6
    assert sample["text"] == hf_tokenizer.decode(sample["token_ids"]) == \
        tok.decode(sample["token_ids"])
    evaluated = json.loads(_cli("eval", str(run_dir), "--dataset", "mine", "--data_dir",
                                str(data), "--eval_iters", "2", "--json", "--device", "cpu"))
    assert evaluated["loss"] > 0


def test_foreign_tokenizer_errors_are_one_clean_line(foreign, corpus, tmp_path, monkeypatch):
    data = str(tmp_path / "data")
    args = ["prepare", "--source", str(corpus), "--data_dir", data, "--tokenizer"]
    assert "does not exist" in _refused(*args, f"hf:{tmp_path / 'nowhere.json'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no tokenizer.json" in _refused(*args, f"hf:{empty}")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    assert "not a valid tokenizer.json" in _refused(*args, f"hf:{bad}")
    # a dataset whose copy was changed is refused by its sha256
    _cli("prepare", "--source", str(corpus), "--name", "mine", "--data_dir", data,
         "--tokenizer", f"hf:{foreign}")
    from llmctl.data.layout import read_meta
    from llmctl.data.tokenizers import tokenizer_from_spec

    copy = tmp_path / "data" / "mine" / "tokenizer.json"
    copy.write_bytes(copy.read_bytes().replace(b"</s>", b"</S>"))
    with pytest.raises(Exception, match="does not match the sha256"):
        tokenizer_from_spec(read_meta(copy.parent)["tokenizer"], copy.parent)
    # without the tokenizers package: the extra to install, in one line
    import importlib

    real = importlib.import_module

    def no_tokenizers(name, *a, **kw):
        if name.split(".")[0] == "tokenizers":
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr("importlib.import_module", no_tokenizers)
    out = _refused(*args, f"hf:{foreign}", "--name", "other")
    assert "tokenizers is not installed; install the extra: pip install 'llmctl[hf]'" in out


def test_a_fine_tuned_foreign_model_exports_with_its_tokenizer(foreign, corpus, tmp_path):
    from llmctl.interop.hf_export import export_checkpoint
    from llmctl.interop.hf_import import load_hf
    from llmctl.interop.hf_init import checkpoint_from_hf

    ckpt = checkpoint_from_hf(f"hf:{foreign}", tmp_path / "imported")
    export_checkpoint(ckpt, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == \
        (foreign / "tokenizer.json").read_bytes()
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert theirs.encode(LINES[1], add_special_tokens=False) == \
        transformers.AutoTokenizer.from_pretrained(foreign).encode(LINES[1],
                                                                 add_special_tokens=False)
    back = load_hf(f"hf:{tmp_path / 'out'}")
    assert back.tokenizer_spec == load_hf(f"hf:{foreign}").tokenizer_spec
