"""Muon for the 2-D hidden weights, AdamW for the rest: the update equals a hand computation,
the split is right, and a stopped + resumed run ends exactly like an uninterrupted one."""

from __future__ import annotations

import math
import signal

import pytest
import torch

from llmctl.config import load_config
from llmctl.core.errors import ConfigError
from llmctl.model import LLM
from llmctl.runtime.checkpoint import read_checkpoint, read_weights
from llmctl.train.optim import MuonWithAdamW, build_optimizer, muon_split, set_lr
from llmctl.train.trainer import Trainer

TINY = {"attn": "mha", "n_layer": 2, "n_embd": 16, "n_head": 2, "n_kv_heads": 2, "block_size": 8,
        "vocab_size": 32, "up_dim": 32, "total_batch_size": 16, "batch_size": 2,
        "optimizer": "muon", "weight_decay": 0.1, "muon_momentum": 0.9}


def _newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic Newton-Schulz orthogonalisation (Keller Jordan's), in float64."""
    a, b, c = 3.4445, -4.775, 2.0315
    x = g.double() / g.double().norm()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def test_two_muon_steps_match_a_hand_computation() -> None:
    torch.manual_seed(0)
    run = load_config({**TINY, "muon_lr": 0.02, "learning_rate": 0.01})
    model = LLM(run.model)
    opt = build_optimizer(model, run.train, torch.device("cpu"))
    assert isinstance(opt, MuonWithAdamW)
    w = model.blocks[0].attn.qkv.weight  # (48, 16): a tall matrix
    wte = model.wte.weight
    w0, wte0 = w.detach().clone().double(), wte.detach().clone()
    grads = [torch.randn_like(w) for _ in range(2)]
    mu, lr, wd = 0.9, 0.02, 0.1
    set_lr(opt, 0.01)  # the schedule's rate; Muon's is scaled to muon_lr
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01, 0.02]
    expected, buf = w0, torch.zeros_like(w0)
    for g in grads:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        w.grad = g.clone()
        wte.grad = torch.ones_like(wte)
        opt.step()
        g = g.double()
        buf = mu * buf + (1 - mu) * g  # momentum (an EMA)
        update = _newton_schulz((1 - mu) * g + mu * buf)  # Nesterov
        expected = expected * (1 - lr * wd) - lr * 0.2 * math.sqrt(48) * update
    # on CPU the Newton-Schulz iteration runs in fp32 (the update is ~0.03 per step)
    assert (w.detach().double() - expected).abs().max() < 1e-5
    assert (w.detach().double() - w0).abs().max() > 0.02  # it did move
    # the embedding went to AdamW: two steps of about -lr * sign(grad), plus decay
    adamw_step = wte0 * (1 - 0.01 * 0.1) ** 2 - 2 * 0.01
    assert torch.allclose(wte.detach(), adamw_step, atol=1e-4)


@pytest.mark.parametrize("arch", [
    {"attn": "mla", "q_latent_dim": 8, "kv_latent_dim": 8, "rope_head_dim": 4,
     "pos_emb": "rope", "norm": "rms", "qk_norm": True, "tie_embeddings": False},
    {"attn": "gqa", "moe": True, "n_exp": 4, "n_shared": 1, "n_act": 2, "aux_free": True,
     "alpha": 0.01, "gamma": 0.01},
])
def test_muon_gets_the_hidden_matrices_and_adamw_the_rest(arch) -> None:
    model = LLM(load_config({**TINY, **arch}).model)
    hidden, rest = muon_split(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for p in hidden}
    assert all(p.dim() == 2 for p in hidden) and muon_names
    assert all(n.startswith("blocks.") and "router" not in n for n in muon_names)
    rest_names = {names[id(p)] for p in rest}
    assert {"wte.weight"} <= rest_names and not any("norm" in n for n in muon_names)
    if arch.get("tie_embeddings") is False:
        assert "lm_head.weight" in rest_names
    assert len(hidden) + len(rest) == len(list(model.parameters()))


def test_bad_muon_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError) as err:
        load_config({**TINY, "optimizer": "lion", "muon_lr": -1, "muon_momentum": 1.0})
    for key in ("train.optimizer", "train.muon_lr", "train.muon_momentum"):
        assert key in str(err.value)
    with pytest.raises(ConfigError, match="fsdp"):
        load_config({**TINY, "fsdp": True})


@pytest.mark.slow
def test_muon_stop_and_resume_ends_like_an_uninterrupted_run(tiny) -> None:
    flags = tiny(max_iters=12, save_model=True, ckpt_interval=100, optimizer="muon",
                 qk_norm=True, tie_embeddings=False, zero_init_proj=True, log_interval=4,
                 learning_rate=0.01)
    Trainer(load_config(overrides={**flags, "file_name": "ref"}), verbose=False).fit()

    stopped = Trainer(load_config(overrides={**flags, "file_name": "b"}), verbose=False)
    step_once = stopped._train_step

    def step_then_signal(feed, stop):  # a real SIGTERM mid-run, as a user's Ctrl-C
        out = step_once(feed, stop)
        if stopped.step == 4:
            signal.raise_signal(signal.SIGTERM)
        return out

    stopped._train_step = step_then_signal
    result = stopped.fit()
    assert result.stopped_by == "SIGTERM" and result.step < 12
    run = stopped.run_dir
    resumed = Trainer(load_config(overrides={**flags, "file_name": "b", "resume": "auto"}),
                      verbose=False).fit()
    assert resumed.resumed_from is not None and resumed.step == 12
    assert read_checkpoint(run / "latest").step == 12
    ref, got = read_weights(run.parent / "ref" / "latest"), read_weights(run / "latest")
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
