"""The training loop in-process: architectures, accumulation, recomputation, eval, divergence."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmctl.config import load_config
from llmctl.infer.evaluate import estimate_loss
from llmctl.infer.load import load_checkpoint
from llmctl.runtime.checkpoint import read_checkpoint, read_weights
from llmctl.train.optim import LRSchedule
from llmctl.train.trainer import Trainer, TrainingDiverged

ARCHS = {
    "mha-learn-layer": {},
    "gqa-rope-rms-swiglu": {"attn": "gqa", "n_kv_heads": 1, "pos_emb": "rope", "norm": "rms",
                            "non_linearity": "swiglu"},
    "mqa-sin-relu": {"attn": "mqa", "pos_emb": "sin", "non_linearity": "relu"},
    "mla-rope": {"attn": "mla", "q_latent_dim": 16, "kv_latent_dim": 16, "rope_head_dim": 8,
                 "pos_emb": "rope"},
    "moe-standard": {"moe": True, "n_exp": 4, "n_shared": 1, "n_act": 2, "coeff": 0.01,
                     "up_dim": 32},
    "moe-aux-free": {"moe": True, "n_exp": 4, "n_shared": 0, "n_act": 2, "aux_free": True,
                     "alpha": 0.01, "gamma": 0.01, "up_dim": 32},
}


def _fit(flags):
    trainer = Trainer(load_config(overrides=flags), verbose=False)
    return trainer, trainer.fit()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_trains_logs_and_checkpoints(tiny, records, arch):
    flags = tiny(file_name=arch, save_model=True, max_iters=12, **ARCHS[arch])
    trainer, result = _fit(flags)
    run = trainer.run
    assert result.step == 12 and result.stopped_by is None

    logged = records(result.run_dir)
    assert [r["step"] for r in logged] == list(range(1, 13))
    first, last = logged[0]["loss"], sum(r["loss"] for r in logged[-3:]) / 3
    assert first > math.log(60) - 0.3  # starts near uniform over the 60 characters
    assert last < first - 0.25, (first, last)  # and learns
    schedule = LRSchedule.from_config(run.train)
    assert [r["lr"] for r in logged] == pytest.approx([schedule(i) for i in range(12)])
    for r in logged:
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["memory_gb"] > 0
        assert r["mfu"] is None  # CPU without --peak_flops
        assert r["tokens"] == r["step"] * 128

    ckpt = read_checkpoint(result.run_dir / "latest")
    assert ckpt.step == 12 and ckpt.run == run
    meta = json.loads((trainer.data.dataset.folder / "meta.json").read_text())
    assert ckpt.tokenizer == meta["tokenizer"]
    assert ckpt.metrics["loss"] == pytest.approx(logged[-1]["loss"])
    saved = read_weights(ckpt.path)
    for name, tensor in trainer.raw_model.state_dict().items():
        assert torch.equal(saved[name], tensor.cpu()), name

    if run.model.has_moe:
        assert all(len(r["imbalance"]) == 2 and r["aux_loss"] > 0 for r in logged)
        biases = [n for n in saved if n.endswith("expert_bias")]
        assert len(biases) == (2 if arch == "moe-aux-free" else 0)
    else:
        assert "imbalance" not in logged[0]


def test_aux_free_bias_update_uses_the_whole_steps_counts(tiny, hetero):
    """After one step of 2 micro-batches the bias is gamma * sign(mean - load) of both."""
    from llmctl.data.loader import PreparedDataset
    from llmctl.model import LLM

    flags = tiny(file_name="bias", max_iters=1, batch_size=2, **hetero)  # 2 micro-steps
    trainer, _ = _fit(flags)
    run = trainer.run
    torch.manual_seed(run.train.seed)
    reference = LLM(run.model)  # the trainer's initial weights: same seed
    data = PreparedDataset.open(run.train.data_dir, run.train.dataset)
    sampler = data.random_batches("train", 2, run.model.block_size, run.train.seed)
    for _ in range(2):
        x, y = sampler.next_batch()
        reference(x, targets=y)
    (load,) = reference.moe_load_counts()
    assert load.sum() == 2 * 2 * 32 * 1  # micro-steps x B x T x routed experts per token
    expected = 0.01 * torch.sign(load.mean() - load)
    assert torch.equal(trainer.raw_model.blocks[1].ffn.expert_bias, expected)


def test_grad_accumulation_matches_one_big_batch(tiny, records):
    """The same 256-token steps as 1x(8x32), 2x(4x32) and 4x(2x32) micro-batches."""
    curves, weights = [], []
    for batch_size in (8, 4, 2):
        _, result = _fit(tiny(file_name=f"b{batch_size}", batch_size=batch_size, max_iters=6,
                              total_batch_size=256, save_model=True))
        curves.append([r["loss"] for r in records(result.run_dir)])
        weights.append(read_weights(result.run_dir / "latest"))
    for curve in curves[1:]:
        assert curve == pytest.approx(curves[0], abs=1e-5)
    for other in weights[1:]:
        for name, tensor in weights[0].items():
            torch.testing.assert_close(other[name], tensor, atol=1e-5, rtol=1e-4)


def test_activation_recomputation_changes_nothing(tiny, records, hetero):
    runs = []
    for recomp in (False, True):
        _, result = _fit(tiny(file_name=f"r{recomp}", act_recomp=recomp, max_iters=5, **hetero))
        runs.append(records(result.run_dir))
    for a, b in zip(*runs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["imbalance"] == b["imbalance"]  # MoE loads are not counted twice


def test_eval_best_checkpoint_and_plot(tiny, records):
    flags = tiny(file_name="ev", eval=True, eval_interval=4, eval_iters=3, save_model=True,
                 ckpt_interval=100, max_iters=12)
    trainer, result = _fit(flags)
    evals = records(result.run_dir, "eval")
    assert [e["step"] for e in evals] == [4, 8, 12]
    best = min(evals, key=lambda e: e["val_loss"])
    assert result.best_val == pytest.approx(best["val_loss"])
    info = read_checkpoint(result.run_dir / "best")
    assert info.step == best["step"] and info.metrics["val_loss"] == pytest.approx(
        best["val_loss"])
    # the best checkpoint reproduces the logged estimate through the public eval API
    loaded = load_checkpoint(result.run_dir / "best", device="cpu")
    sampler = trainer.data.sampler("val", seed=flags["seed"] + 2)
    assert estimate_loss(loaded.model, sampler, 3) == pytest.approx(best["val_loss"], abs=1e-5)
    png = (result.run_dir / "loss_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_mfu_with_given_peak_flops(tiny, records):
    from llmctl.model.costs import training_flops_per_token

    trainer, result = _fit(tiny(file_name="mfu", peak_flops=1e12, max_iters=2))
    per_token = training_flops_per_token(trainer.run.model)
    for r in records(result.run_dir):
        assert r["mfu"] == pytest.approx(per_token * r["tokens_per_s"] / 1e12)


def test_bf16_autocast_on_cpu(tiny, records):
    _, result = _fit(tiny(file_name="bf16", dtype="bfloat16", max_iters=4))
    losses = [r["loss"] for r in records(result.run_dir)]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("flags, message", [
    ({"init_std": 1e37}, r"the loss is nan at step 1;"),
    ({"learning_rate": 1e4, "grad_clip": 0.0, "warmup_steps": 0},
     r"the gradient norm is inf at step 2;"),
])
def test_divergence_stops_and_keeps_last_good_checkpoint(tiny, flags, message):
    flags = tiny(file_name="nan", save_model=True, ckpt_interval=1, max_iters=20, **flags)
    with pytest.raises(TrainingDiverged, match=message + r" stopped without applying"):
        _fit(flags)
    latest = read_checkpoint_or_none(flags)
    bad_step = int(message.split("at step ")[1][0])
    if bad_step == 1:
        assert latest is None
    else:
        assert latest.step == bad_step - 1
        assert all(torch.isfinite(t).all() for t in read_weights(latest.path).values())


@pytest.mark.gpu
def test_cuda_bf16_compile_and_act_recomp(tiny, records):
    _, result = _fit(tiny(file_name="gpu", device="cuda", compile=True, act_recomp=True,
                          max_iters=12, save_model=True))
    logged = records(result.run_dir)
    assert logged[-1]["loss"] < logged[0]["loss"] - 0.25
    assert all(r["memory_gb"] > 0 for r in logged)
    assert read_checkpoint(result.run_dir / "latest").step == 12


def read_checkpoint_or_none(flags):
    from pathlib import Path

    path = Path(flags["out_dir"]) / flags["file_name"] / "latest"
    return read_checkpoint(path) if path.exists() else None


def test_mtp_logs_each_depths_loss_and_reloads(tiny, records, hetero):
    flags = tiny(file_name="mtp", max_iters=6, save_model=True, mtp_depth=2, mtp_weight=0.5,
                 **hetero)
    trainer, result = _fit(flags)
    train = [r for r in records(result.run_dir) if r["kind"] == "train"]
    assert all(len(r["mtp_loss"]) == 2 for r in train)
    assert all(math.isfinite(v) and v > 0 for r in train for v in r["mtp_loss"])
    # the imbalance list covers the MTP modules' aux-free MoE blocks too (1 + 2)
    assert len(train[-1]["imbalance"]) == 3
    assert train[-1]["mtp_loss"] != train[0]["mtp_loss"]
    loaded = load_checkpoint(result.run_dir / "latest", device="cpu")
    assert loaded.model.config.mtp_depth == 2 and len(loaded.model.mtp) == 2
    weights = read_weights(result.run_dir / "latest")
    assert any(name.startswith("mtp.1.") for name in weights)
