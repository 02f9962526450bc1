"""llmctl eval through the real CLI: --full and --text against hand computations, the trainer's
random-batch estimate, and bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.config import load_config
from llmctl.data.loader import PreparedDataset
from llmctl.data.prepare import PrepareOptions, prepare_dataset
from llmctl.model import LLM
from llmctl.runtime.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[2]
BLOCK, BATCH, ITERS, SEED = 16, 3, 4, 123
TEXT = ("The fox ran to the river and drank. The tree sang to the fox, and the fox slept. "
        "Then the river rose, and the fox woke up and ran home.\n") * 4
ARCHS = {
    "mha": {"attn": "mha", "n_head": 2, "pos_emb": "learn"},
    "moe": {"attn": "gqa", "n_head": 4, "n_kv_heads": 2, "moe": True, "n_exp": 4,
            "n_shared": 1, "n_act": 2, "aux_free": True, "alpha": 0.01, "gamma": 0.01,
            "pos_emb": "sin"},
}
runner = CliRunner()




def prepare(data_dir: Path, name: str, tokenizer: str, text: str = TEXT) -> PreparedDataset:
    source = data_dir.parent / f"{name}.txt"
    source.write_text(text, encoding="utf-8")
    prepare_dataset(PrepareOptions(source=str(source), name=name, data_dir=data_dir,
                                   tokenizer=tokenizer, val_fraction=0.2, num_proc=1,
                                   progress=False))
    return PreparedDataset.open(data_dir, name)


def make_checkpoint(path: Path, dataset: PreparedDataset, arch: str = "mha",
                    train_steps: int = 30) -> Path:
    """A tiny LLM trained a few steps on the dataset's train split, saved with its tokenizer."""
    torch.manual_seed(0)
    run = load_config({"n_layer": 2, "n_embd": 32, "up_dim": 64, "block_size": BLOCK,
                       "vocab_size": dataset.vocab_size, "dataset": dataset.name,
                       "data_dir": str(dataset.folder.parent), "batch_size": BATCH,
                       "eval_iters": ITERS, "seed": SEED, **ARCHS[arch]},
                      check_batch_split=False)
    model = LLM(run.model)
    sampler = dataset.random_batches("train", 8, BLOCK, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(train_steps):
        x, y = sampler.next_batch()
        loss = model(x, targets=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(path, state_dict=model.state_dict(), run=run, step=train_steps,
                           tokenizer=dataset.tokenizer_spec, files=dataset.tokenizer_files())


def load(ckpt: Path) -> LLM:
    from llmctl.runtime.checkpoint import load_model

    return load_model(ckpt)[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(char dataset, byte dataset, checkpoint trained on the char one)."""
    root = tmp_path_factory.mktemp("eval")
    chars = prepare(root / "data", "fox", "char")
    raw = prepare(root / "data", "fox_bytes", "byte")
    return chars, raw, make_checkpoint(root / "run" / "best", chars)


def invoke(*args):
    return runner.invoke(app, ["eval", *map(str, args)])


def eval_json(*args) -> dict:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def hand_full_loss(model: LLM, tokens: np.ndarray) -> tuple[float, int]:
    """-mean log p over every token after the first, one block_size window at a time."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, BLOCK):
            window = torch.as_tensor(np.asarray(tokens[start:start + BLOCK + 1], dtype=np.int64))
            x, y = window[:-1], window[1:]
            logp = model(x[None], targets=y[None]).logits[0].double().log_softmax(-1)
            nll -= logp[torch.arange(len(y)), y].sum().item()
            count += len(y)
    return nll / count, count


# ------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("arch", ["mha", "moe"])  # every kind: tests/test_evaluate.py
def test_full_split_equals_hand_computation(world, tmp_path, arch):
    chars, _, _ = world
    ckpt = make_checkpoint(tmp_path / "ckpt", chars, arch=arch, train_steps=5)
    val = chars.tokens("val")
    assert (len(val) - 1) % BLOCK != 0  # a short last window is part of the test
    expected, count = hand_full_loss(load(ckpt), val)
    for batch in ("1", "4"):
        out = eval_json(ckpt, "--full", "--batch_size", batch)
        assert out["tokens"] == count == len(val) - 1
        assert out["loss"] == pytest.approx(expected, rel=1e-5)
        assert out["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    train = eval_json(ckpt, "--full", "--split", "train")
    assert train["tokens"] == len(chars.tokens("train")) - 1


def test_default_estimate_is_the_trainers(world):
    """Without --full: eval_iters batches of batch_size random windows, seeded as the trainer
    seeds its val estimate (seed + 2), so it reproduces the val_loss the trainer logged."""
    chars, _, ckpt = world
    out = eval_json(ckpt.parent)  # run folder -> best
    assert out["tokens"] == ITERS * BATCH * BLOCK and f"seed {SEED + 2}" in out["method"]
    model = load(ckpt)
    sampler = chars.random_batches("val", BATCH, BLOCK, seed=SEED + 2)
    losses = []
    with torch.no_grad():
        for _ in range(ITERS):
            x, y = sampler.next_batch()
            losses.append(F.cross_entropy(model(x, targets=y).logits.flatten(0, 1),
                                          y.flatten()).item())
    assert out["loss"] == pytest.approx(sum(losses) / ITERS, rel=1e-5)
    again = eval_json("--model_path", ckpt, "--eval-iters", str(ITERS))
    assert again["loss"] == out["loss"]  # deterministic
    other = eval_json(ckpt, "--seed", "9", "--eval_iters", "2", "--batch-size", "5")
    assert other["tokens"] == 2 * 5 * BLOCK and other["loss"] != out["loss"]


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_reproduces_the_val_and_train_loss_the_trainer_recorded(world, tmp_path, nproc):
    chars, _, _ = world
    trained = runner.invoke(app, [
        "train", "--dataset", chars.folder.name, "--data_dir", str(chars.folder.parent),
        "--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--up_dim", "32",
        "--block_size", str(BLOCK), "--vocab_size", str(chars.vocab_size), "--batch_size", "2",
        "--total_batch_size", str(4 * BLOCK), "--max_iters", "2", "--warmup_steps", "1",
        "--eval", "--eval_interval", "2", "--eval_iters", "3", "--save_model",
        "--out_dir", str(tmp_path), "--file_name", "run", "--device", "cpu",
        "--nproc", str(nproc)])
    assert trained.exit_code == 0, trained.output
    recorded = json.loads((tmp_path / "run" / "best" / "config.json").read_text())["metrics"]
    val = eval_json(tmp_path / "run")
    train = eval_json(tmp_path / "run", "--split", "train")
    assert val["loss"] == pytest.approx(recorded["val_loss"], rel=1e-6)
    assert train["loss"] == pytest.approx(recorded["train_loss"], rel=1e-6)


def test_text_file_equals_hand_computation(world, tmp_path):
    chars, _, ckpt = world
    text = "The river sang, and the fox ran home to the tree.\n"
    path = tmp_path / "notes.txt"
    path.write_text(text, encoding="utf-8")
    out = eval_json(ckpt, "--text", path, "--batch_size", "2")
    ids = np.asarray(chars.tokenizer.encode(text))
    expected, count = hand_full_loss(load(ckpt), ids)
    assert out["tokens"] == count == len(text) - 1  # char level: one token per character
    assert out["loss"] == pytest.approx(expected, rel=1e-5)
    assert out["source"] == f"text {path}"


def test_table_output_and_dataset_overrides(world, tmp_path):
    chars, _, ckpt = world
    shutil.copytree(chars.folder, tmp_path / "copy")  # same tokens, another name and folder
    result = invoke(ckpt, "--full", "--dataset", "copy", "--data-dir", tmp_path)
    assert result.exit_code == 0, result.output
    out = eval_json(ckpt, "--full")
    for needle in ("tokens evaluated", f"{out['tokens']:,}", "loss", f"{out['loss']:.4f}",
                   "perplexity", "dataset copy (val)"):
        assert needle in result.stdout, result.stdout


# ------------------------------------------------------------------------------ bad input


def _error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_dataset_of_another_tokenizer_is_refused(world):
    _, raw, ckpt = world
    _error(invoke(ckpt, "--dataset", raw.name), "tokenized with byte", "char(")


def test_missing_dataset_names_the_prepare_command(world, tmp_path):
    _, _, ckpt = world
    _error(invoke(ckpt, "--dataset", "shakespeare", "--data_dir", tmp_path),
           "llmctl prepare shakespeare")
    _error(invoke(ckpt, "--dataset", "nope", "--data_dir", tmp_path), "llmctl prepare")


def test_bad_options_and_text_files(world, tmp_path):
    _, _, ckpt = world
    _error(invoke(ckpt, "--split", "test"), "split")
    _error(invoke(ckpt, "--text", tmp_path / "missing.txt"), "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _error(invoke(ckpt, "--text", empty), "is empty")
    one = tmp_path / "one.txt"
    one.write_text("T")
    _error(invoke(ckpt, "--text", one), "at least 2")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    _error(invoke(ckpt, "--text", binary), "not UTF-8")
    outside = tmp_path / "outside.txt"
    outside.write_text("Zebra §§§")
    _error(invoke(ckpt, "--text", outside), "outside the char vocabulary")
    _error(invoke(ckpt, "--text", one, "--dataset", "fox"), "--dataset")
    _error(invoke(ckpt, "--full", "--eval_iters", "3"), "--full")
    _error(invoke(ckpt, "--eval_iters", "0"))
    _error(invoke(ckpt, "--device", "nonsense"), "is not one of auto, cpu, cuda")
    _error(invoke(ckpt, "--device", "meta"), "is not one of auto, cpu, cuda")
    _error(invoke(), "missing checkpoint")


def test_split_shorter_than_a_window(world, tmp_path):
    """Random windows need block_size + 1 tokens; the exact pass takes any split of >= 2."""
    _, raw, _ = world
    byte_ckpt = make_checkpoint(tmp_path / "bytes", raw, train_steps=0)
    tiny = prepare(tmp_path / "data", "tiny", "byte", text=TEXT[:40])
    assert len(tiny.tokens("val")) < BLOCK + 1
    args = (byte_ckpt, "--dataset", "tiny", "--data_dir", tmp_path / "data")
    _error(invoke(*args), "too few for block_size")
    out = eval_json(*args, "--full")
    assert out["tokens"] == len(tiny.tokens("val")) - 1


@pytest.mark.parametrize("damage", ["no_folder", "no_config", "truncated", "wrong_shape",
                                    "pickle"])
def test_bad_checkpoints(world, tmp_path, damage):
    chars, raw, ckpt = world
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    weights = bad / "model.safetensors"
    if damage == "no_folder":
        shutil.rmtree(bad)
    elif damage == "no_config":
        (bad / "config.json").unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "wrong_shape":
        other = make_checkpoint(tmp_path / "other", raw, train_steps=0)
        shutil.copyfile(other / "model.safetensors", weights)
    else:
        weights.unlink()
        torch.save({"wte": torch.zeros(2)}, bad / "model.pt")
    needle = {"no_folder": "does not exist", "no_config": "config.json is missing",
              "truncated": "truncated or corrupted", "wrong_shape": "do not fit",
              "pickle": "pickle"}[damage]
    _error(invoke(bad, "--full"), needle)


def test_real_process_reports_without_traceback(world, tmp_path):
    _, _, ckpt = world
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    proc = subprocess.run([sys.executable, "-m", "llmctl", "eval", str(bad), "--full"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "truncated or corrupted" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.gpu
def test_cuda_autocast_agrees_with_cpu(world):
    _, _, ckpt = world
    cpu = eval_json(ckpt, "--full", "--device", "cpu")
    mixed = eval_json(ckpt, "--full", "--device", "cuda")  # bf16 (or fp16) autocast
    fp32 = eval_json(ckpt, "--full", "--device", "cuda", "--dtype", "float32")
    assert mixed["tokens"] == fp32["tokens"] == cpu["tokens"]
    assert mixed["loss"] == pytest.approx(cpu["loss"], rel=2e-2)
    assert fp32["loss"] == pytest.approx(cpu["loss"], rel=1e-3)
