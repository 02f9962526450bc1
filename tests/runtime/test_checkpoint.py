"""Checkpoint folders: atomic writes, tied weights, recovery, and refusal of unsafe input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from llmctl.config import load_config
from llmctl.runtime.checkpoint import (
    CheckpointError,
    load_training_state,
    load_weights,
    read_checkpoint,
    read_weights,
    resolve_checkpoint,
    save_checkpoint,
)


class Tied(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("bias_buf", torch.arange(3.0))


@pytest.fixture
def run():
    return load_config({"n_layer": 2, "n_embd": 8, "n_head": 2, "block_size": 16,
                        "vocab_size": 11, "total_batch_size": 32})


def _save(path, model, run, step=7, **kw):
    return save_checkpoint(path, state_dict=model.state_dict(), run=run, step=step,
                           metrics={"val_loss": 1.5}, tokenizer={"kind": "byte"}, **kw)


def test_round_trip_keeps_ties_config_and_state(tmp_path, run):
    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters())
    model.proj(torch.randn(2, 4)).sum().backward()
    opt.step()
    _save(tmp_path / "ckpt", model, run, optimizer_state=opt.state_dict(),
          trainer_state={"best_val": 1.25, "sampler": {"calls": 3}})

    info = read_checkpoint(tmp_path / "ckpt")
    assert info.run == run and info.step == 7 and info.metrics == {"val_loss": 1.5}
    assert info.tokenizer == {"kind": "byte"}
    stored = read_weights(info.path, {n: tuple(t.shape) for n, t in Tied().state_dict().items()})
    assert stored["head.weight"] is stored["emb.weight"]  # stored once, alias restored

    fresh = Tied()
    load_weights(info.path, fresh)
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    assert fresh.head.weight is fresh.emb.weight

    opt_state, trainer_state = load_training_state(tmp_path / "ckpt")
    assert trainer_state == {"best_val": 1.25, "sampler": {"calls": 3}}
    assert torch.equal(opt_state["state"][2]["exp_avg"], opt.state_dict()["state"][2]["exp_avg"])


def test_run_folder_resolves_best_then_latest(tmp_path, run):
    (tmp_path / "metrics.jsonl").write_text("")  # a run trained without --save_model
    with pytest.raises(CheckpointError, match="saves them only with --save_model"):
        resolve_checkpoint(tmp_path)
    _save(tmp_path / "latest", Tied(), run, step=5)
    assert resolve_checkpoint(tmp_path) == tmp_path / "latest"
    _save(tmp_path / "best", Tied(), run, step=3)
    assert resolve_checkpoint(tmp_path) == tmp_path / "best"
    assert resolve_checkpoint(tmp_path / "latest" / "config.json") == tmp_path / "latest"


def test_files_get_the_usual_permissions(tmp_path, run):
    old = os.umask(0o022)
    try:
        folder = _save(tmp_path / "ckpt", Tied(), run, optimizer_state={"state": {}},
                       trainer_state={})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes == dict.fromkeys(modes, 0o644) and "model.safetensors" in modes


def test_overwrite_leaves_no_temporaries(tmp_path, run):
    _save(tmp_path / "latest", Tied(), run, step=1)
    _save(tmp_path / "latest", Tied(), run, step=2)
    assert sorted(os.listdir(tmp_path)) == ["latest"]
    assert read_checkpoint(tmp_path / "latest").step == 2


def test_between_the_renames_readers_read_the_old_one_and_the_writer_restores(tmp_path, run):
    _save(tmp_path / "latest", Tied(), run, step=4)
    os.replace(tmp_path / "latest", tmp_path / ".latest.old")  # state after the first rename
    assert read_checkpoint(tmp_path / "latest").step == 4  # read in place...
    assert read_checkpoint(tmp_path).step == 4  # ...also through the run folder
    assert not (tmp_path / "latest").exists()  # ...and never renamed by a reader
    _save(tmp_path / "best", Tied(), run, step=5)  # another checkpoint: leaves latest alone
    assert not (tmp_path / "latest").exists()
    _save(tmp_path / "latest", Tied(), run, step=6)  # the writer finishes the job
    assert read_checkpoint(tmp_path / "latest").step == 6
    assert sorted(os.listdir(tmp_path)) == ["best", "latest"]


def test_a_reader_during_a_save_does_not_break_it(tmp_path, run, monkeypatch):
    _save(tmp_path / "latest", Tied(), run, step=1)
    real_replace = os.replace
    seen = []

    def replace_and_read(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".latest.old"):  # a reader arrives between the two renames
            seen.append(read_checkpoint(tmp_path / "latest").step)

    monkeypatch.setattr(os, "replace", replace_and_read)
    _save(tmp_path / "latest", Tied(), run, step=2)
    monkeypatch.setattr(os, "replace", real_replace)
    assert seen == [1]
    assert read_checkpoint(tmp_path / "latest").step == 2


def test_failed_write_keeps_previous_checkpoint(tmp_path, run):
    """A save that hits a file-size limit (like a full disk) fails cleanly, old one intact."""
    _save(tmp_path / "latest", Tied(), run, step=1)
    script = textwrap.dedent(f"""
        import resource, signal, sys, torch
        sys.path.insert(0, {os.getcwd()!r})
        from llmctl.config import load_config
        from llmctl.runtime.checkpoint import save_checkpoint, CheckpointError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        run = load_config({{"n_layer": 2, "n_embd": 8, "n_head": 2, "block_size": 16,
                           "vocab_size": 11, "total_batch_size": 32}})
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        big = {{"w": torch.zeros(100_000)}}
        try:
            save_checkpoint({str(tmp_path / "latest")!r}, state_dict=big, run=run, step=2)
        except CheckpointError as err:
            print("REFUSED", err)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert "REFUSED" in out.stdout, out.stderr
    assert "intact" in out.stdout
    assert read_checkpoint(tmp_path / "latest").step == 1
    assert sorted(os.listdir(tmp_path)) == ["latest"]


def test_refuses_pickles(tmp_path, run):
    pickled = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickled)
    with pytest.raises(CheckpointError, match="never unpickles"):
        resolve_checkpoint(pickled)
    folder = tmp_path / "legacy"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "ckpt.pt")
    with pytest.raises(CheckpointError, match="never unpickles"):
        resolve_checkpoint(folder)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_damaged_weights_are_clear_errors(tmp_path, run, damage):
    folder = _save(tmp_path / "ckpt", Tied(), run)
    weights = folder / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "garbage":
        weights.write_bytes(b"not a safetensors file at all" * 10)
    else:
        weights.unlink()
    with pytest.raises(CheckpointError, match="truncated|corrupted|missing"):
        load_weights(folder, Tied())


def test_missing_weights_beside_the_optimizer_state_say_so(tmp_path, run):
    folder = _save(tmp_path / "ckpt", Tied(), run, optimizer_state={"state": {}})
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors is missing"):
        load_weights(folder, Tied())


def test_wrong_shapes_listed(tmp_path, run):
    folder = _save(tmp_path / "ckpt", Tied(vocab=11), run)
    with pytest.raises(CheckpointError, match=r"emb.weight: checkpoint has \(11, 4\), model "
                                              r"needs \(13, 4\)"):
        load_weights(folder, Tied(vocab=13))


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"step": 3}),
                                     json.dumps({"config": {"n_layer": "x"}})])
def test_bad_config_json(tmp_path, run, content):
    folder = _save(tmp_path / "ckpt", Tied(), run)
    if content is None:
        (folder / "config.json").unlink()
    else:
        (folder / "config.json").write_text(content)
    with pytest.raises(CheckpointError):
        read_checkpoint(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope")
