"""Sampling through the int8 screen of the head: top-k draws are the full head's for the same
random numbers, and untruncated draws (rejection) follow the softmax exactly."""

from __future__ import annotations

import math

import pytest
import torch

from llmctl.infer import greedy_head, sampled_head
from llmctl.infer.greedy_head import ScreenedArgmax, head_logits
from llmctl.infer.sampled_head import ScreenedSampler
from llmctl.infer.sampling import mask_padding, sample_next

pytestmark = pytest.mark.skipif(
    not greedy_head._kernel_available(64, torch.device("cpu")),
    reason="no vectorized int8 product on this CPU (the decoder uses the full head)")


@pytest.fixture(autouse=True)
def _small_heads_too(monkeypatch):
    monkeypatch.setattr(greedy_head, "MIN_NUMBERS", 0)
    monkeypatch.setattr(sampled_head, "TOP_K_MIN_NUMBERS", 0)


def _sampler(V: int, C: int, kind: str = "gaussian", softcap: float | None = None,
             scale: float = 0.02, seed: int = 0) -> ScreenedSampler:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, C, generator=g) * scale
    if kind == "outliers":  # a few rows much larger, some all zero
        w[::97] *= 40
        w[5::211] = 0
    elif kind == "ties":  # duplicated rows: equal logits around the k-th
        w = w[: V // 8].repeat(8, 1)
    screen = ScreenedArgmax.build(w, w.t().contiguous, softcap)
    assert screen is not None
    return ScreenedSampler(screen)


def _full_draw(sampler: ScreenedSampler, rows, temperature, top_k, vocab_limit, generator):
    logits = head_logits(rows, sampler.screen.full_head(), sampler.softcap)
    return sample_next(mask_padding(logits, vocab_limit), temperature, top_k, None, generator)


@pytest.mark.parametrize("kind", ["gaussian", "outliers"])
@pytest.mark.parametrize("softcap", [None, 0.5])
@pytest.mark.parametrize("vocab_limit", [None, 3000])
@pytest.mark.parametrize("top_k", [1, 40, 400])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_top_k_draws_are_the_full_heads(kind, softcap, vocab_limit, top_k,
                                        temperature) -> None:
    sampler = _sampler(4096, 64, kind, softcap)
    g = torch.Generator().manual_seed(1)
    screened = 0
    for seed in range(30):
        rows = torch.randn(1, 64, generator=g) * 3
        ours = sampler(rows, temperature, top_k, vocab_limit, torch.Generator().manual_seed(seed))
        full = _full_draw(sampler, rows, temperature, top_k, vocab_limit,
                          torch.Generator().manual_seed(seed))
        if ours is not None:
            screened += 1
            assert ours.tolist() == full.tolist()
    # the screen decided nearly every draw itself (where a few rows are 40 times larger,
    # the bound, one for all rows, lets too many tokens reach the top k)
    assert screened >= (25 if kind == "gaussian" else 0)


@pytest.mark.parametrize("softcap", [None, 0.5])
def test_batched_top_k_draws_are_the_full_heads(softcap) -> None:
    sampler = _sampler(4096, 64, softcap=softcap)
    g = torch.Generator().manual_seed(9)
    for seed in range(10):
        rows = torch.randn(4, 64, generator=g) * (1 + torch.arange(4.0))[:, None]  # unlike
        ours = sampler(rows, 0.9, 40, 4000, torch.Generator().manual_seed(seed))
        assert ours is not None and ours.shape == (4,)
        full = _full_draw(sampler, rows, 0.9, 40, 4000, torch.Generator().manual_seed(seed))
        assert ours.tolist() == full.tolist()
    assert sampler(rows, 1.0, None) is None  # untruncated: one row at a time only


def test_top_k_ties_at_the_kth_logit_all_stay() -> None:
    sampler = _sampler(4096, 64, "ties")
    rows = torch.randn(1, 64, generator=torch.Generator().manual_seed(2))
    logits = head_logits(rows, sampler.screen.full_head(), None)[0]
    kth = torch.topk(logits, 12).values[-1]
    allowed = set((logits >= kth).nonzero()[:, 0].tolist())
    assert len(allowed) >= 16  # rows repeat 8 times: the k-th value is shared
    drawn = {int(sampler(rows, 1.0, 12, None, torch.Generator().manual_seed(s)))
             for s in range(400)}
    assert drawn == allowed


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_untruncated_draws_follow_the_softmax(softcap, monkeypatch) -> None:
    V, draws, temperature = 48, 20000, 1.0
    sampler = _sampler(V, 64, softcap=softcap, scale=0.1)
    rows = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    # A screen that is off by up to +-0.15 per token (alternating), with its bound widened to
    # match (still a bound): the proposals are far from the target, rejection must fix them.
    screened, l2 = sampler.screen.screen(rows)
    skewed = (screened.float() + 0.15 * torch.tensor([1.0, -1.0]).repeat(V // 2)).bfloat16()
    moved = float((skewed.double() - screened.double()).abs().max())
    sampler.screen.per_l2 += 2 * moved / l2.item()
    monkeypatch.setattr(sampler.screen, "screen", lambda rows, vocab_limit=None: (skewed, l2))
    exact_calls = []
    exact = sampler.exact
    monkeypatch.setattr(sampler, "exact",
                        lambda row, ids: exact_calls.append(1) or exact(row, ids))
    g = torch.Generator().manual_seed(4)
    counts = torch.zeros(V, dtype=torch.float64)
    full_head = 0  # a long rejection chain ends there (as the decoder does), exact too
    for _ in range(draws):
        token = sampler(rows, temperature, None, None, g)
        if token is None:
            full_head += 1
            token = _full_draw(sampler, rows, temperature, None, None, g)
        counts[int(token)] += 1
    target = head_logits(rows, sampler.screen.full_head(), softcap)[0].double() / temperature
    target = target.softmax(dim=-1)
    # the proposal alone (every bound accepted) is far off: the test can tell
    hi = sampler.bounds(skewed[0], l2.item() * sampler.screen.per_l2)[1]
    proposal = (hi / temperature).softmax(dim=-1)
    df = V - 1
    limit = df + 6 * math.sqrt(2 * df)  # six standard deviations of chi-square(df)
    assert full_head < 0.01 * draws
    assert len(exact_calls) > 1.1 * draws  # rejections happened, and were redrawn
    assert _chi_square(proposal * draws, target) > 3 * limit
    assert _chi_square(counts, target) < limit


def test_the_full_head_decides_where_the_screen_cannot() -> None:
    sampler = _sampler(4096, 64)
    rows = torch.randn(1, 64, generator=torch.Generator().manual_seed(5))
    assert sampler(rows, 1e-3, None) is None  # the bound is wide against the temperature
    assert sampler(rows, 1.0, None) is not None
    assert sampler(rows, 1.0, 2000) is None  # too many tokens can be among the top k
    broken = rows.clone()
    broken[0, 3] = float("nan")
    assert sampler(broken, 1.0, None) is None
    assert sampler(broken, 1.0, 40) is None
    inf = rows.clone()
    inf[0, 0] = float("inf")
    assert sampler(inf, 1.0, None) is None


def test_top_k_defers_to_the_full_head_below_its_size(monkeypatch) -> None:
    sampler = _sampler(4096, 64)
    rows = torch.randn(1, 64, generator=torch.Generator().manual_seed(7))
    assert sampler(rows, 1.0, 40) is not None
    monkeypatch.setattr(sampled_head, "TOP_K_MIN_NUMBERS", 4096 * 64 + 1)
    assert sampler(rows, 1.0, 40) is None
    assert sampler(rows, 1.0, 4096) is not None  # k >= the vocabulary: no truncation
    assert sampler(rows, 1.0, 0) is not None


def test_seeded_untruncated_draws_repeat() -> None:
    sampler = _sampler(4096, 64)
    rows = torch.randn(1, 64, generator=torch.Generator().manual_seed(6))
    runs = [[int(sampler(rows, 1.0, None, None, g)) for _ in range(50)]
            for g in (torch.Generator().manual_seed(8), torch.Generator().manual_seed(8))]
    assert runs[0] == runs[1] and len(set(runs[0])) > 10
