"""Evaluation numerics: the whole-split loss against a hand computation, the sampled estimate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmctl.config import load_config
from llmctl.core.errors import LlmctlError
from llmctl.data.loader import RandomBatchSampler
from llmctl.infer.evaluate import estimate_loss, full_split_loss
from llmctl.model import LLM

VOCAB, BLOCK = 37, 8


ARCHS = {
    "mha": {"attn": "mha", "n_head": 2, "pos_emb": "learn"},
    "gqa": {"attn": "gqa", "n_head": 4, "n_kv_heads": 2, "pos_emb": "rope", "norm": "rms"},
    "mla": {"attn": "mla", "n_head": 2, "q_latent_dim": 8, "kv_latent_dim": 8,
            "rope_head_dim": 4, "pos_emb": "rope"},
    "moe": {"attn": "mqa", "n_head": 2, "moe": True, "n_exp": 4, "n_shared": 1, "n_act": 2,
            "coeff": 0.01, "pos_emb": "sin"},
}


def tiny_model(arch: str = "mha", seed: int = 0) -> LLM:
    torch.manual_seed(seed)
    run = load_config({"n_layer": 2, "n_embd": 16, "up_dim": 32, "vocab_size": VOCAB,
                       "block_size": BLOCK, **ARCHS[arch]}, check_batch_split=False)
    return LLM(run.model)


def hand_loss(model: LLM, tokens: np.ndarray, block: int) -> float:
    """-mean log p(token | its window's preceding tokens), one unpadded window at a time."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, block):
            window = torch.as_tensor(tokens[start:start + block + 1], dtype=torch.long)
            x, y = window[:-1][None], window[1:]
            logp = model(x, targets=x).logits[0].double().log_softmax(-1)  # (T, V)
            total -= sum(logp[t, int(y[t])].item() for t in range(len(y)))
            count += len(y)
    return total / count


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("length", [2, 9, 23, 33])
def test_full_split_loss_equals_hand_computation(arch, length):
    model = tiny_model(arch)
    tokens = np.random.default_rng(length).integers(0, VOCAB, size=length).astype(np.uint16)
    result = full_split_loss(model, tokens, block_size=BLOCK, batch_size=2)
    assert result.tokens == length - 1  # every token but the first predicted exactly once
    assert result.loss == pytest.approx(hand_loss(model, tokens, BLOCK), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))


def test_full_split_loss_does_not_depend_on_batch_size():
    model = tiny_model()
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=51)
    losses = {b: full_split_loss(model, tokens, BLOCK, b).loss for b in (1, 3, 7, 100)}
    assert max(losses.values()) - min(losses.values()) < 1e-5, losses


def test_full_split_loss_needs_two_tokens():
    with pytest.raises(LlmctlError, match="need at least 2"):
        full_split_loss(tiny_model(), np.array([3]), BLOCK, 4)


@pytest.mark.parametrize("was_training", [True, False])
def test_estimate_loss_is_the_mean_batch_loss_and_restores_the_mode(was_training):
    model = tiny_model("moe")  # MoE: the estimate is the LM loss, without the aux term
    tokens = np.random.default_rng(2).integers(0, VOCAB, size=200)
    model.train(was_training)
    estimate = estimate_loss(model, RandomBatchSampler(tokens, 3, BLOCK, seed=5), iters=4,
                             autocast_ctx=None)
    assert model.training is was_training
    assert all(p.grad is None for p in model.parameters())

    model.eval()
    sampler, expected = RandomBatchSampler(tokens, 3, BLOCK, seed=5), []
    with torch.no_grad():
        for _ in range(4):
            x, y = sampler.next_batch()
            logits = model(x, targets=y).logits
            expected.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
    assert isinstance(estimate, float)
    assert estimate == pytest.approx(sum(expected) / 4, rel=1e-6)


def test_estimate_loss_rejects_zero_iters():
    with pytest.raises(LlmctlError, match="at least 1"):
        estimate_loss(tiny_model(), RandomBatchSampler(np.arange(30) % VOCAB, 2, BLOCK, 0), 0, None)
