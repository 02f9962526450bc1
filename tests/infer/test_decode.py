"""Sampling with the KV cache: equals a cache-less cropping reference, filters, seeds, EOT."""

from __future__ import annotations

import pytest
import torch

from llmctl.config import load_config
from llmctl.core.errors import LlmctlError
from llmctl.infer.decode import generate, stream_tokens
from llmctl.model import LLM


def _model(**flags) -> LLM:
    base = dict(n_layer=2, n_embd=32, n_head=4, n_kv_heads=2, vocab_size=53, block_size=16,
                up_dim=48, q_latent_dim=16, kv_latent_dim=8, rope_head_dim=4,
                init_std=0.1)  # larger weights: sharper logits, fewer near-ties in argmax
    torch.manual_seed(0)
    return LLM(load_config(overrides={**base, **flags}, check_batch_split=False).model)


def _reference_greedy(model: LLM, idx: torch.Tensor, n: int) -> torch.Tensor:
    """No cache: every step runs the last block_size tokens from scratch."""
    model.eval()
    with torch.no_grad():
        for _ in range(n):
            logits = model(idx[:, -model.config.block_size:], use_cache=False).logits[:, -1]
            idx = torch.cat((idx, logits.argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("pos_emb", ["learn", "rope"])
@pytest.mark.parametrize("attn", ["mha", "mqa", "gqa", "mla"])
def test_greedy_beyond_block_size_equals_cropping_reference(attn: str, pos_emb: str) -> None:
    model = _model(attn=attn, pos_emb=pos_emb, moe=True, n_exp=4, n_shared=1, n_act=2,
                   coeff=0.01)
    prompt = torch.randint(0, 53, (2, 5))
    got = generate(model, prompt, 30, temperature=0)  # 5 + 30 tokens > block_size 16
    assert got.shape == (2, 35)
    assert torch.equal(got, _reference_greedy(model, prompt, 30))


def test_prompt_longer_than_block_size_is_cropped() -> None:
    model = _model()
    prompt = torch.randint(0, 53, (1, 40))
    got = generate(model, prompt, 6, temperature=0)
    assert torch.equal(got[:, :40], prompt)
    assert torch.equal(got, _reference_greedy(model, prompt, 6))


def test_seeded_sampling_is_reproducible() -> None:
    model = _model(attn="gqa", pos_emb="rope")
    prompt = torch.randint(0, 53, (3, 4))

    def sample(seed: int) -> torch.Tensor:
        return generate(model, prompt, 20, temperature=1.0, top_k=20, top_p=0.95,
                        generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))
    streamed = torch.stack(list(stream_tokens(model, prompt, 20, temperature=1.0, top_k=20,
                                              top_p=0.95,
                                              generator=torch.Generator().manual_seed(7))), 1)
    assert torch.equal(streamed, sample(7)[:, 4:])


def test_generation_restores_the_training_mode() -> None:
    model = _model().train()
    generate(model, torch.zeros(1, 2, dtype=torch.long), 3, temperature=0)
    assert model.training


def _first(row: torch.Tensor, token: int) -> int | None:
    hits = (row == token).nonzero()
    return int(hits[0]) if len(hits) else None


def test_eot_stops_generation() -> None:
    model = _model()
    prompt = torch.randint(0, 53, (1, 3))
    free = generate(model, prompt, 12, temperature=0)[0, 3:]
    eot = int(free[4])
    stop = _first(free, eot)  # <= 4
    stopped = generate(model, prompt, 12, temperature=0, eot_id=eot)
    assert torch.equal(stopped[0, 3:], free[: stop + 1])  # up to and including the EOT


def test_eot_pads_rows_that_finished_first() -> None:
    model = _model()
    prompt = torch.randint(0, 53, (2, 3))
    free = generate(model, prompt, 12, temperature=0)[:, 3:]
    eot = int(free[0, 2])
    stops = [_first(row, eot) for row in free]
    end = 12 if None in stops else max(stops) + 1  # the stream ends when every row is done
    stopped = generate(model, prompt, 12, temperature=0, eot_id=eot)[:, 3:]
    assert stopped.shape == (2, end)
    for row, stop in enumerate(stops):
        n = end if stop is None else stop + 1
        assert torch.equal(stopped[row, :n], free[row, :n])
        assert (stopped[row, n:] == eot).all()


def test_max_new_tokens_zero_returns_the_prompt() -> None:
    prompt = torch.randint(0, 53, (1, 4))
    assert torch.equal(generate(_model(), prompt, 0), prompt)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(temperature=float("nan")),
                                    dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_settings_are_user_errors(kwargs) -> None:
    with pytest.raises(LlmctlError):
        generate(_model(), torch.zeros(1, 2, dtype=torch.long), 3, **kwargs)


def test_padding_ids_of_a_padded_vocabulary_are_never_sampled() -> None:
    model = _model()
    with torch.no_grad():  # make the padding rows (ids 40..52) the most likely by far
        model.lm_head.weight[40:] *= 50
    prompt = torch.randint(0, 40, (4, 3))
    free = generate(model, prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert (free[:, 3:] >= 40).any()  # without a limit the padding ids do come out
    for temperature in (0.0, 1.0):
        out = generate(model, prompt, 20, temperature=temperature, vocab_limit=40,
                       generator=torch.Generator().manual_seed(0))
        assert (out[:, 3:] < 40).all()


@pytest.mark.parametrize("attn", ["mha", "gqa", "mla"])
def test_alibi_samples_past_block_size_with_a_sliding_cache(attn: str) -> None:
    model = _model(attn=attn, pos_emb="alibi").eval()
    prompt = torch.randint(0, 53, (1, 5))
    got = generate(model, prompt, 30, temperature=0)  # 35 tokens > block_size 16
    assert got.shape == (1, 35)
    # Up to block_size the sliding cache is the plain cache: the cropping reference agrees.
    assert torch.equal(got[:, :16], _reference_greedy(model, prompt, 11))
    # Past it, each step drops the oldest cached token and feeds the newest one.
    with torch.no_grad():
        cache = model(got[:, :16]).kv_cache
        for t in range(16, 34):
            cache.drop_oldest(1)
            logits = model(got[:, t:t + 1], kv_cache=cache).logits  # (1, 1, V)
            assert cache.length == 16
            assert int(logits[0, -1].argmax()) == int(got[0, t + 1])
