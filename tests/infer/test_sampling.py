"""The next token from logits: the filters, and the draw (exact in distribution, seeded,
never a token of weight zero)."""

from __future__ import annotations

import math

import pytest
import torch

from llmctl.core.errors import LlmctlError
from llmctl.infer.sampling import (
    draw,
    invert_cdf,
    next_token_probs,
    sample_next,
    top_k_filter,
    top_p_filter,
    unnormalised_weights,
)

# ---------------------------------------------------------------- filtered distributions

LOGITS = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))


def test_top_k_keeps_the_k_most_likely_renormalised() -> None:
    probs = next_token_probs(LOGITS, temperature=1.0, top_k=2)
    assert torch.allclose(probs, torch.tensor([[0.0, 0.5, 0.0, 0.3]]) / 0.8)
    assert torch.equal(top_k_filter(LOGITS, 0), LOGITS)  # 0 = off
    assert torch.equal(top_k_filter(LOGITS, 10), LOGITS)  # k >= vocab: nothing removed


@pytest.mark.parametrize("p,support", [(0.4, [1]), (0.75, [1, 3]), (0.85, [1, 2, 3]),
                                       (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_set_reaching_p(p: float, support: list[int]) -> None:
    probs = next_token_probs(LOGITS, temperature=1.0, top_p=p)
    base = LOGITS.exp()[0]
    expected = torch.zeros(4)
    expected[support] = base[support] / base[support].sum()
    assert torch.allclose(probs[0], expected, atol=1e-6)
    assert torch.isinf(top_p_filter(LOGITS, p)[0, [i for i in range(4) if i not in support]]
                       ).all()


def test_temperature_and_greedy() -> None:
    probs = next_token_probs(LOGITS, temperature=0.5)
    sharpened = LOGITS.exp() ** 2
    assert torch.allclose(probs, sharpened / sharpened.sum(), atol=1e-6)
    assert torch.equal(next_token_probs(LOGITS, temperature=0), torch.tensor([[0., 1, 0, 0]]))


def test_top_k_then_top_p_and_samples_stay_in_support() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 100) * 3
    probs = next_token_probs(logits, temperature=0.8, top_k=10, top_p=0.6)
    for row, p in zip(logits, probs, strict=True):
        support = p.nonzero().flatten()
        top10 = (row / 0.8).topk(10).indices
        assert set(support.tolist()) <= set(top10.tolist())
        ordered = torch.softmax((row / 0.8)[top10], -1)  # sorted, as topk returns
        n = int((ordered.cumsum(0) - ordered < 0.6).sum())
        assert len(support) == n
        assert p.sum().item() == pytest.approx(1.0)
    generator = torch.Generator().manual_seed(1)
    draws = torch.stack([draw(probs, generator) for _ in range(500)], dim=1)  # (4, 500)
    assert torch.gather(probs, 1, draws).gt(0).all()




# ---------------------------------------------------------------- the draw


def test_draws_follow_the_distribution() -> None:
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(3, 40) * 1.5, dim=-1)  # (3, 40)
    generator = torch.Generator().manual_seed(0)
    n = 20_000
    counts = torch.zeros(3, 40)
    for _ in range(n // 100):  # 100 draws per row at a time: the rows repeated
        ids = draw(probs.repeat_interleave(100, dim=0), generator).view(3, 100)
        counts.scatter_add_(1, ids, torch.ones(3, 100))
    # every count within 5 binomial standard deviations of its expectation
    sd = (n * probs * (1 - probs)).sqrt()
    assert ((counts - n * probs).abs() <= 5 * sd + 1).all()
    # and the draws spread over the support as a whole: a chi-square far from its tail
    chi2 = ((counts - n * probs) ** 2 / (n * probs)).sum(dim=-1)
    assert (chi2 < 39 + 6 * math.sqrt(2 * 39)).all()


def test_a_multiple_of_the_weights_draws_the_same_tokens() -> None:
    torch.manual_seed(1)
    weights = torch.rand(2, 64)
    first = draw(weights, torch.Generator().manual_seed(3))
    assert torch.equal(draw(weights * 8, torch.Generator().manual_seed(3)), first)


def test_the_same_seed_draws_the_same_tokens_and_rows_draw_apart() -> None:
    weights = torch.ones(64, 1000)
    first = draw(weights, torch.Generator().manual_seed(5))
    assert torch.equal(draw(weights, torch.Generator().manual_seed(5)), first)
    assert len(set(first.tolist())) > 50  # one uniform per row, not one for all


@pytest.mark.parametrize("uniform", [0.0, 0.3, 1 / 3, 0.5, 1 - 2.0 ** -53])
def test_tokens_of_weight_zero_are_never_chosen(uniform: float) -> None:
    # zero weights first, between and last; the extremes of the uniform number (the largest
    # below 1 times a total of 3 rounds to below it, not to it)
    weights = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 2.0, 0.0, 0.0]], dtype=torch.float64)
    cdf = weights.cumsum(-1)
    chosen = int(invert_cdf(cdf, torch.tensor([[uniform]], dtype=torch.float64))[0])
    assert weights[0, chosen] > 0
    assert chosen == (2 if uniform < 1 / 3 else 5)


def test_one_uniform_per_row_picks_by_the_running_sum() -> None:
    cdf = torch.tensor([[1.0, 3.0, 6.0], [0.0, 2.0, 2.0]], dtype=torch.float64)
    ids = invert_cdf(cdf, torch.tensor([[0.2], [0.999]], dtype=torch.float64))
    assert ids.tolist() == [1, 1]  # 1.2 passes 1, not 3; 1.998 of 2: the last weighted id


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_are_a_clear_error(bad: float) -> None:
    logits = torch.zeros(2, 10)
    logits[1, 3] = bad
    with pytest.raises(LlmctlError, match="not finite"):
        sample_next(logits, temperature=1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_are_a_clear_error_under_top_k(bad: float) -> None:
    logits = torch.zeros(1, 10)
    logits[0, :4] = torch.tensor([5.0, 4.0, 4.0, 4.0])  # ties at the k-th could hide a NaN
    logits[0, 7] = bad
    with pytest.raises(LlmctlError, match="not finite"):
        sample_next(logits, temperature=1.0, top_k=3)


def test_one_row_under_top_k_draws_the_masked_rows_token() -> None:
    # the kept tokens' weights alone give the running sums of the masked row, whose other
    # weights are zeros: the same token for the same uniform number
    g = torch.Generator().manual_seed(3)
    for trial in range(200):
        V = int(torch.randint(5, 300, (1,), generator=g))
        logits = (torch.randn(1, V, generator=g) * 3).round(decimals=trial % 3)  # ties too
        if trial % 4 == 0:
            logits[0, V // 2:] = float("-inf")  # a padded vocabulary's ids
        k = int(torch.randint(1, V, (1,), generator=g))
        seed = int(torch.randint(0, 2**31, (1,), generator=g))
        masked = unnormalised_weights(top_k_filter(logits / 0.8, k))
        expected = draw(masked, torch.Generator().manual_seed(seed))
        chosen = sample_next(logits, 0.8, k, None, torch.Generator().manual_seed(seed))
        assert torch.equal(chosen, expected), trial
        assert masked[0, chosen] > 0


def test_sampled_tokens_follow_the_filtered_distribution() -> None:
    """sample_next draws from next_token_probs: temperature, top-k and top-p together."""
    torch.manual_seed(2)
    logits = torch.randn(1, 30) * 2
    probs = next_token_probs(logits, temperature=0.7, top_k=12, top_p=0.9)[0]  # (30,)
    generator = torch.Generator().manual_seed(0)
    n = 10_000
    ids = torch.cat([sample_next(logits.expand(100, 30), 0.7, 12, 0.9, generator)
                     for _ in range(n // 100)])
    counts = torch.bincount(ids, minlength=30).float()
    assert (counts[probs == 0] == 0).all()
    sd = (n * probs * (1 - probs)).sqrt()
    assert ((counts - n * probs).abs() <= 5 * sd + 1).all()


def test_unnormalised_weights_are_the_softmax_times_its_sum() -> None:
    scaled = torch.tensor([[0.5, float("-inf"), 2.0, -1.0]])
    weights = unnormalised_weights(scaled)
    assert weights[0, 2] == 1 and weights[0, 1] == 0  # the row's max weighs 1
    assert torch.allclose(weights / weights.sum(), scaled.softmax(-1))
