"""The int8 screen of the head keeps to its error bound and picks the full head's argmax."""

from __future__ import annotations

import pytest
import torch

from llmctl.infer import greedy_head
from llmctl.infer.greedy_head import ScreenedArgmax
from llmctl.model.transformer import soft_cap

pytestmark = pytest.mark.skipif(
    not greedy_head._kernel_available(64, torch.device("cpu")),
    reason="no vectorized int8 product on this CPU (the decoder uses the full head)")
PAYS = greedy_head.MIN_NUMBERS


@pytest.fixture(autouse=True)
def _small_heads_too(monkeypatch):
    monkeypatch.setattr(greedy_head, "MIN_NUMBERS", 0)  # tiny heads here, screened all the same


def _head(kind: str, V: int = 4096, C: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, C, generator=g) * 0.02
    if kind == "outliers":  # a few rows much larger, some all zero
        w[::97] *= 40
        w[5::211] = 0
    elif kind == "near_ties":  # groups of rows whose logits differ in the last bits
        base = torch.randn(V // 64, C, generator=g)
        w = base.repeat_interleave(64, dim=0) + 1e-7 * torch.randn(V, C, generator=g)
    elif kind == "exact_ties":  # duplicated rows: equal logits, the first id must win
        w = torch.randn(V // 8, C, generator=g).repeat(8, 1)
    return w


def _screen(w: torch.Tensor, softcap: float | None = None) -> ScreenedArgmax:
    screen = ScreenedArgmax.build(w, w.t().contiguous, softcap)
    assert screen is not None
    return screen


@pytest.mark.parametrize("kind", ["gaussian", "outliers"])
@pytest.mark.parametrize("C", [16, 64, 256])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_the_int8_product_keeps_to_the_bound(kind, C, scale) -> None:
    w = _head(kind, C=C)
    screen = _screen(w)
    rows = torch.randn(5, C) * scale
    rows[0] = 0.0  # all zero: every logit 0 both ways
    approx = torch._weight_int8pack_mm(rows.bfloat16(), screen.q, screen.scales).double()
    full = torch.mm(rows, screen.full_head()).double()
    exact = rows.double() @ w.double().t()
    slack = (torch.linalg.vector_norm(rows.double(), dim=1) * screen.per_l2
             + approx.abs().amax(dim=1) * screen.per_logit)[:, None]
    assert ((approx - full).abs() <= slack).all()
    assert ((approx - exact).abs() <= slack).all()
    # the bound is tight enough to be useful: within 50x of the error actually made
    assert ((approx - full).abs().amax(dim=1)[1:] * 50 > slack[1:, 0]).all()


@pytest.mark.parametrize("kind", ["gaussian", "outliers", "near_ties", "exact_ties"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("vocab_limit", [None, 3000])
@pytest.mark.parametrize("softcap", [None, 0.5])
def test_the_screened_argmax_is_the_full_heads(kind, batch, vocab_limit, softcap) -> None:
    w = _head(kind)
    screen = _screen(w, softcap)
    g = torch.Generator().manual_seed(1)
    for trial in range(25):
        rows = torch.randn(batch, w.shape[1], generator=g) * (0.1 + trial)
        logits = torch.mm(rows, w.t().contiguous())
        if softcap:
            logits = soft_cap(logits, softcap)
        expected = logits[:, :vocab_limit].argmax(dim=-1)
        assert torch.equal(screen(rows, vocab_limit), expected)
        assert torch.equal(screen.full(rows, vocab_limit), expected)


def test_ties_go_to_the_first_id_and_a_screen_that_cannot_narrow_defers() -> None:
    w = torch.ones(4096, 64) * 0.01  # every logit equal: all survive, the full head decides
    screen = _screen(w)
    assert screen(torch.randn(3, 64)).tolist() == [0, 0, 0]
    w = _head("exact_ties")  # rows j and j + 512 are the same
    screen = _screen(w)
    assert (screen(torch.randn(6, 64)) < 512).all()


def test_a_token_that_survives_alone_is_chosen_without_reading_its_row() -> None:
    w = _head("gaussian")
    screen = _screen(w)
    ids = torch.tensor([7, 1234, 4095])
    rows = w[ids] * 400  # each row points at one token's weights: it alone survives
    assert torch.equal(screen(rows), ids)
    screen.weight = torch.full_like(w, float("nan"))  # the fp32 rows are never read
    screen.full_head = None
    for row, token in zip(rows, ids, strict=True):
        assert torch.equal(screen(row[None]), token[None])
    twin = torch.stack((rows[0], rows[0] * 2))  # a batch whose rows agree: one survivor
    assert torch.equal(screen(twin), ids[[0, 0]])


def test_rows_that_are_not_finite_get_the_full_heads_answer() -> None:
    screen = _screen(_head("gaussian"))
    rows = torch.randn(3, 64)
    rows[1, 3] = float("nan")
    rows[2, 5] = float("inf")
    for batch in (rows, rows[1:2], rows[2:3]):
        assert torch.equal(screen(batch), screen.full(batch))


def test_the_screen_is_built_only_where_it_is_safe_and_pays(monkeypatch) -> None:
    monkeypatch.setattr(greedy_head, "MIN_NUMBERS", PAYS)

    def build(w):
        return ScreenedArgmax.build(w, w.t().contiguous, None)

    assert build(torch.randn(4096, 64)) is not None
    assert build(torch.randn(4096, 64, dtype=torch.float64)) is not None
    assert build(torch.randn(4096, 40)) is None  # the kernel reads 16 numbers at a time
    assert build(torch.randn(16, 64)) is None  # too small to pay
    assert build(torch.randn(4096, 64).half()) is None
    for bad in (float("nan"), float("inf")):
        w = torch.randn(4096, 64)
        w[7, 7] = bad
        assert build(w) is None
    monkeypatch.setattr(greedy_head, "MIN_NUMBERS", 0)
    assert build(torch.randn(16, 64)) is not None
