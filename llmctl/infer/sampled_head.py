"""A sampled token from the output head without reading all of the fp32 head, exact in
distribution.

A sampled step draws from softmax(z / T) over the top-k logits z, and the fp32 head that
computes every z_j is the largest matrix a small model's step reads (`greedy_head` says why
that costs more than its bytes). `ScreenedSampler` starts from the int8 screen of
`greedy_head.ScreenedArgmax`, whose screened logit y_j lies within a proven bound b_j of z_j.
Untruncated, it samples by rejection: it proposes token j with probability proportional to
exp(hi_j / T), hi_j = y_j + b_j >= z_j, computes that token's exact logit (one row of the
head) and accepts it with probability exp((z_j - hi_j) / T). Whatever happened before, an
accepted token is j with probability proportional to exp(z_j / T): the draw is exact. A
rejected token's exact weight replaces its bound in the proposal (adaptive rejection, still
exact), so a step reads a few rows of the head; at random init and T = 1, nine steps in ten
accept the first proposal.

With top-k the draw is the full head's own (`sampling.sample_next`), over fewer tokens: a
token whose upper bound is below the lower bound of the k-th screened logit cannot be among
the k largest logits, and has weight zero there. Only the others get exact logits (their
rows of the head gathered: about a tenth of the vocabulary at random init, where the k-th
logit sits in the dense middle), and the draw over them in id order picks the full head's
token for the same random number (ties at the k-th value stay, as `top_k_filter` keeps
them), batched too, but where the gathered rows' fp32 products differ from the full head's
in the last bit and a random number falls within that rounding of a boundary. That pays
only for large heads (TOP_K_MIN_NUMBERS).

Untruncated draws use other random numbers than the full head's (`sampling.draw`, one
uniform per step), so their seeded text differs from the reference path's while every
token's probability is the same, up to the float rounding of the weights. Where the bound
is wide against the temperature (acceptance could be poor), too many tokens can reach the
top k, with top-p, for an untruncated batch, or where a rejection chain runs long, the
caller samples from the full head (`__call__` returns None; restarting there is exact too).
"""

from __future__ import annotations

import math

import torch

from ..model.transformer import soft_cap
from .greedy_head import ScreenedArgmax, bf16_floor
from .sampling import invert_cdf, sample_next, truncates_top_k

# the widest bound 2 b_j over the temperature: acceptance is at least e^-_MAX_WIDTH
_MAX_WIDTH = 1.0
# more tokens than this share of the vocabulary can be among the top k: gathering their rows
# of the head costs about what the whole product does
_MAX_EXACT_SHARE = 1 / 3
# top-k through the screen only for heads of at least this many numbers: below, the small
# operations it adds cost more than the fp32 head's bytes it saves (on a 2-core Xeon: 0.96x
# the full head at 8192 x 256, 1.03x at 16384 x 256, 1.35x at 50304 x 256)
TOP_K_MIN_NUMBERS = 1 << 22
# proposals per step before the full head decides (each rejection makes one weight exact)
_MAX_ATTEMPTS = 8


class ScreenedSampler:
    """`(rows (B, C), temperature, top_k, vocab_limit, generator) -> (B,) ids | None`: a
    token per row drawn from softmax(logits / temperature) restricted to the top-k logits,
    where the logits are those of the head `screen` screens, whose (V, C) weights it holds
    (None: the caller's full head decides).

    Token j's fp32 logit lies in [lo(y_j), hi(y_j)], y_j its screened logit and
    lo(y) = y - c - r|y|, hi(y) = y + c + r|y| (c from the row's norm, r per unit of |y|;
    soft-capped where the model caps). Both grow with y, so the k-th largest of either is
    at the k-th largest y, and a threshold on y stands for a threshold on either."""

    def __init__(self, screen: ScreenedArgmax):
        self.screen, self.weight = screen, screen.weight
        self.softcap, self.per_logit = screen.softcap, screen.per_logit

    def exact(self, row: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(C,) row, (n,) ids -> their (n,) logits, soft-capped where the model caps (the
        product of their rows of the head: any summation order is within the bound)."""
        z = torch.mv(self.weight.index_select(0, ids), row)  # (n,)
        return soft_cap(z, self.softcap) if self.softcap else z

    def interval(self, y: float, c: float) -> tuple[float, float]:
        """(lo(y), hi(y)) for one screened logit, row slack c."""
        half = c + self.per_logit * abs(y)
        lo, hi = y - half, y + half
        if self.softcap:  # monotone; its fp32 tanh rounds by less than tie_cap
            cap, slack = self.softcap, self.screen.tie_cap
            lo, hi = cap * math.tanh(lo / cap) - slack, cap * math.tanh(hi / cap) + slack
        return lo, hi

    def bounds(self, y: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`interval` of every screened logit in `y` (float64 tensors)."""
        y = y.double()
        half = y.abs().mul_(self.per_logit).add_(c)
        lo, hi = y - half, y.add_(half)
        if self.softcap:
            cap, slack = self.softcap, self.screen.tie_cap
            lo, hi = soft_cap(lo, cap).sub_(slack), soft_cap(hi, cap).add_(slack)
        return lo, hi

    def _lowest_reaching(self, bound: float, c: float) -> float:
        """A number at most the smallest y with hi(y) >= bound (in bf16 comparisons)."""
        if self.softcap:  # undo the cap: hi(y) before capping must reach atanh's value
            cap = self.softcap
            inside = (bound - self.screen.tie_cap) / cap
            if inside <= -1:
                return -math.inf
            bound = cap * math.atanh(min(inside, 1 - 2.0 ** -52))
            bound -= 2.0 ** -30 * (abs(bound) + cap)  # atanh's rounding, generously
        rest = bound - c
        y = rest / (1 + self.per_logit) if rest >= 0 else rest / (1 - self.per_logit)
        return bf16_floor(y - 2.0 ** -40 * abs(y))

    @staticmethod
    def _truncates(vocab: int, top_k: int | None, vocab_limit: int | None) -> bool:
        """Whether top-k leaves out some of the `vocab` ids below `vocab_limit`."""
        return truncates_top_k(top_k, min(vocab, vocab_limit or vocab))

    @staticmethod
    def applies(head_shape: tuple[int, int], batch: int, top_k: int | None,
                vocab_limit: int | None = None) -> bool:
        """Whether a draw of `batch` rows from a (V, C) head may go through the screen:
        top-k for heads of at least TOP_K_MIN_NUMBERS, untruncated at one row."""
        V, C = head_shape
        if ScreenedSampler._truncates(V, top_k, vocab_limit):
            return V * C >= TOP_K_MIN_NUMBERS
        return batch == 1  # rejection runs row by row

    def __call__(self, rows: torch.Tensor, temperature: float, top_k: int | None,
                 vocab_limit: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor | None:
        if not self.applies(tuple(self.weight.shape), rows.shape[0], top_k, vocab_limit):
            return None
        screened, l2 = self.screen.screen(rows, vocab_limit)  # (B, V'), (B,)
        if self._truncates(self.weight.shape[0], top_k, vocab_limit):
            return self._top_k(rows, screened, l2, temperature, top_k, generator)
        y, c = screened[0], l2.item() * self.screen.per_l2  # (V',) bf16
        low, high = (float(v) for v in torch.aminmax(y))
        # the widest interval (the cap only narrows one, but for its rounding)
        widest = 2 * (c + self.per_logit * max(abs(low), abs(high)))
        widest += 2 * self.screen.tie_cap if self.softcap else 0.0
        if not widest / temperature <= _MAX_WIDTH:  # also NaN / inf: the full head decides
            return None
        top = self.interval(high, c)[1]  # every logit is at most this
        upper = self.bounds(y, c)[1]  # (V',)
        # weights relative to the largest bound: every weight <= 1, the best near 1
        weights = (upper - top).div_(temperature).exp_()
        chosen = self._draw(rows[0], y, c, weights, upper, top, temperature, generator)
        return None if chosen is None else torch.tensor([chosen], device=rows.device)

    def _top_k(self, rows: torch.Tensor, y: torch.Tensor, l2: torch.Tensor, temperature: float,
               k: int, generator: torch.Generator | None) -> torch.Tensor | None:
        """The draw of `sampling.sample_next` for the (B, C) rows, restricted to the tokens
        that can be among some row's k largest logits (in id order: the same tokens for the
        same random numbers), or None where too many can."""
        kth = torch.topk(y, k, dim=-1).values[:, -1].tolist()  # (B,) k-th screened logits
        # the k tokens of the largest y have logits >= lo(kth), so the k-th logit is too: a
        # token whose hi is below that is out of the row's top k, with weight zero
        floors = []
        for kth_y, norm in zip(kth, l2.tolist(), strict=True):
            c = norm * self.screen.per_l2
            floors.append(self._lowest_reaching(self.interval(kth_y, c)[0], c))
        if not all(map(math.isfinite, kth + floors)):
            return None
        if len(floors) == 1:
            reach = (y[0] >= floors[0]).nonzero()[:, 0]  # (S,)
        else:  # the thresholds are bf16 floors: compared in fp32 they stay at most the bound
            floor = torch.tensor(floors, dtype=torch.float32, device=y.device)[:, None]
            reach = (y >= floor).any(dim=0).nonzero()[:, 0]
        if reach.numel() > y.shape[-1] * _MAX_EXACT_SHARE:
            return None
        logits = torch.mm(rows, self.weight.index_select(0, reach).t())  # (B, S)
        if self.softcap:
            logits = soft_cap(logits, self.softcap)
        return reach[sample_next(logits, temperature, k, None, generator)]  # (B,)

    def _draw(self, row: torch.Tensor, y: torch.Tensor, c: float, weights: torch.Tensor,
              upper: torch.Tensor, top: float, temperature: float,
              generator: torch.Generator | None) -> int | None:
        """Adaptive rejection over `weights` (from the upper bounds `upper` of every id):
        the chosen id, or None after _MAX_ATTEMPTS proposals or where a bound fails."""
        exact_at: set[int] = set()
        for _ in range(_MAX_ATTEMPTS):
            uniform = torch.rand(2, dtype=torch.float64, generator=generator)
            at = int(invert_cdf(weights.cumsum(0)[None], uniform[None, :1]))
            if at in exact_at:
                return at
            z = float(self.exact(row, torch.tensor([at], device=row.device)))
            if not self.interval(float(y[at]), c)[0] <= z <= float(upper[at]):
                return None
            exact_weight = math.exp((z - top) / temperature)
            if float(uniform[1]) * float(weights[at]) < exact_weight:  # accepted: with
                return at  # probability exact weight / bound's weight
            weights[at] = exact_weight
            exact_at.add(at)
        return None
