"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from llmctl.config import load_config
from llmctl.model import LLM
from llmctl.train.optim import LRSchedule, build_optimizer, param_groups

TINY = {"n_layer": 2, "n_embd": 16, "n_head": 2, "n_kv_heads": 2, "block_size": 8,
        "vocab_size": 32, "up_dim": 32, "total_batch_size": 16, "batch_size": 2}


@pytest.mark.parametrize("arch", [
    {"attn": "mha", "norm": "layer"},
    {"attn": "mla", "q_latent_dim": 8, "kv_latent_dim": 8, "rope_head_dim": 4,
     "pos_emb": "rope", "norm": "rms"},
    {"attn": "gqa", "moe": True, "n_exp": 4, "n_shared": 1, "n_act": 2, "aux_free": True,
     "alpha": 0.01, "gamma": 0.01},
])
def test_only_matrices_decay_and_every_parameter_is_in_one_group(arch):
    model = LLM(load_config({**TINY, **arch}).model)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["params"]
    grouped = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(grouped) == len(set(grouped))  # the tied embedding / head appears once
    assert set(grouped) == {id(p) for p in model.parameters()}
    # norms' gains and biases are never decayed
    norm_params = {id(p) for n, p in model.named_parameters() if "norm" in n}
    assert norm_params and norm_params <= {id(p) for p in no_decay["params"]}


def test_decay_applies_to_weights_only():
    model = LLM(load_config(TINY).model)
    cfg = load_config({**TINY, "weight_decay": 0.5, "learning_rate": 0.1}).train
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: only decay can move a parameter
    opt.step()
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            assert torch.allclose(p, before[name] * (1 - 0.1 * 0.5)), name
        else:
            assert torch.equal(p, before[name]), name


def test_schedule_warmup_cosine_and_floor():
    s = LRSchedule(peak=1.0, final=0.1, warmup=10, total=110)
    assert s(0) == pytest.approx(0.1) and s(4) == pytest.approx(0.5)
    assert s(9) == pytest.approx(1.0) and s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.55)  # half-way through the cosine
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    values = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # monotone decay
    expected = 0.1 + 0.45 * (1 + math.cos(math.pi * 30 / 100))
    assert s(40) == pytest.approx(expected)


def test_schedule_from_config_uses_min_lr_default():
    cfg = load_config({**TINY, "learning_rate": 6e-4, "warmup_steps": 0, "max_iters": 50}).train
    s = LRSchedule.from_config(cfg)
    assert s(0) == pytest.approx(6e-4) and s(50) == pytest.approx(6e-5)
    cfg = load_config({**TINY, "min_lr": 0.0, "warmup_steps": 5, "max_iters": 50}).train
    assert LRSchedule.from_config(cfg)(50) == 0.0
