"""The greedy choice from the output head, exact, without reading the whole fp32 head.

At batch 1 the head is the largest matrix a small model's decoding step reads (8192 x 256
in fp32 is 8 MB, more than the four blocks of a 4 x 256 model together), and once a step's
weights outgrow the CPU's last-level cache every byte of them comes from main memory.
Greedy decoding needs only the argmax. `ScreenedArgmax` screens the vocabulary with an int8
copy of the head (a quarter of the bytes) whose error has a proven bound: a token whose
screened logit lies more than twice the bound below the best one cannot be the argmax. Only
the rows of the fp32 head that survive are read and multiplied, and the argmax of their
exact logits is the argmax of all of them (a token that survives alone is the argmax without
its row; the head's (C, V) copy for whole-vocabulary products is made only where the full
head decides, on first use: at GPT-2 124M's shape that copy is 154 MB). Two fp32 products
of the same numbers need not agree to the last bit (MKL's AVX-512 kernels sum a column in
an order that depends on its place in the product), so where another survivor's exact logit
lies within that rounding of the best one, the full head decides: exact ties still go to
the first id.

The bound, for one row h and token j (u = 2^-8, bf16's unit roundoff; g = C 2^-24 / (1 - C
2^-24), fp32 summation over C numbers). The screen computes y_j = bf16(sum_i h'_i W'_ji),
summed in fp32, with h' = bf16(h) (|h - h'| <= u|h|) and W' = q_j s_j, exact (a 7-bit integer
times a bf16 scale); e_j = W_j - W'_j is measured when the copy is made. The fp32 logit z_j
of the full head is within g sum|h||W| of the exact sum. By Cauchy-Schwarz, with
N_j = max(|W_j|_2, |W'_j|_2):

    |z_j - y_j| <= |h|_2 (|e_j|_2 + N_j (u + g (2 + u))) + u / (1 - u) |y_j|

`ScreenedArgmax` takes the largest |e_j|_2 and N_j over j, times a margin for the
second-order terms, and needs of the |y_j| only the best one's (`__call__`). The int8
product is torch's `_weight_int8pack_mm`, whose CPU kernels (AVX2, AVX-512, scalar)
dequantize to fp32, accumulate in fp32 and round the sum to bf16 once, as above; they read
whole 16-number groups of a row without checking, so the screen is only built for widths
that are a multiple of 16, and tests hold the kernel to the bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..model.transformer import soft_cap

_UNIT = 2.0 ** -8  # bf16's unit roundoff
_FP32_UNIT = 2.0 ** -24
# the second-order terms the bound leaves out (products of roundoffs) are far below this
_MARGIN = 1.25
# below this many numbers in the head the fp32 product is as cheap as the screen itself
MIN_NUMBERS = 1 << 18
# more survivors than this share of the vocabulary: the full head costs less than gathering
_MAX_SURVIVOR_SHARE = 1 / 16
# numbers of the head quantized at a time: the chunk and its scratch stay in a core's cache
# across the passes over it (a quarter faster than 4096 rows at 50304 x 768)
_CHUNK_NUMBERS = 1 << 18


def _kernel_available(width: int, device: torch.device) -> bool:
    """Whether the int8 product runs vectorized and safely for rows of `width` numbers."""
    if device.type != "cpu" or width % 16 or not hasattr(torch, "_weight_int8pack_mm"):
        return False
    return torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512"))


def head_logits(rows: torch.Tensor, head_t: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """(B, C) rows -> (B, V) logits through the (C, V) head, soft-capped when `softcap`."""
    logits = torch.mm(rows, head_t)
    return soft_cap(logits, softcap) if softcap else logits


def full_argmax(rows: torch.Tensor, head_t: torch.Tensor, softcap: float | None,
                vocab_limit: int | None = None) -> torch.Tensor:
    """The argmax from every logit below `vocab_limit` (what the screen stands in for)."""
    return head_logits(rows, head_t, softcap)[:, :vocab_limit].argmax(dim=-1)


def bf16_floor(x: float) -> float:
    """A number at most x that stays at most x when rounded to bf16 (one bf16 step lower
    than x is more than the half step of rounding; 2^-126 covers the subnormals)."""
    return x - abs(x) * 2.0 ** -7 - 2.0 ** -126


class ScreenedArgmax:
    """`(rows (B, C), vocab_limit) -> (B,)` token ids: the argmax of the rows' logits through
    the (V, C) head `weight` (then soft-capped by `softcap` when set), found by the int8
    screen. `full_head()` gives the head's (C, V) weights for the whole vocabulary's
    logits, called only where the full head decides (the caller builds them on first use).
    `build` returns None where the screen is not available or not worth it."""

    def __init__(self, weight: torch.Tensor, full_head: Callable[[], torch.Tensor],
                 softcap: float | None):
        V, C = weight.shape
        self.weight, self.full_head, self.softcap = weight.detach(), full_head, softcap
        self.max_survivors = max(16, int(V * _MAX_SURVIVOR_SHARE))
        q = torch.empty(V, C, dtype=torch.int8, device=weight.device)
        scales = torch.empty(V, dtype=torch.bfloat16, device=weight.device)
        error_norms = []
        chunk = max(1, _CHUNK_NUMBERS // C)  # rows
        for start in range(0, V, chunk):
            w = weight[start:start + chunk].detach().float()
            s = (w.abs().amax(dim=1) / 127).to(torch.bfloat16)
            s = s.float().masked_fill_(s == 0, 1.0)[:, None]  # an all-zero row: q = 0, exact
            rows = torch.div(w, s).round_().clamp_(-127, 127)
            q[start:start + len(w)] = rows
            scales[start:start + len(w)] = s[:, 0]
            error = torch.sub(w, rows.mul_(s), out=rows)  # W - W', W' exact: 7 bits x bf16
            error_norms.append(float(torch.linalg.vector_norm(error, dim=1).max()))
        # max() would pass over a NaN (inf / NaN weights): the norms carry it to per_l2
        error_norm = max(error_norms) if all(map(math.isfinite, error_norms)) else math.inf
        weight_norm = float(torch.linalg.vector_norm(weight.detach().float(), dim=1).max())
        # fp64 weights were rounded to fp32 above: by at most u32 |W_j|
        error_norm += weight_norm * _FP32_UNIT if weight.dtype == torch.float64 else 0.0
        weight_norm += error_norm  # |W'_j| <= |W_j| + |e_j|
        self.q, self.scales = q, scales
        g = C * _FP32_UNIT / (1 - C * _FP32_UNIT)
        # slack per unit of |h|_2 (the fp32 norms round by parts in 2^22: in the margin)
        self.per_l2 = (error_norm + weight_norm * (_UNIT + g * (2 + _UNIT))) * _MARGIN
        self.per_logit = _UNIT / (1 - _UNIT) * _MARGIN  # slack per unit of |y|
        # two fp32 products of one row and column (the survivors' and the full head's, whose
        # kernels may sum in different orders) differ by at most 2 g |h|_2 |W_j|_2: exact
        # logits closer than twice that to the best could rank apart in the full head
        self.tie_per_l2 = 4 * g * weight_norm * _MARGIN
        self.tie_cap = 2.0 ** -20 * softcap if softcap else 0.0  # tanh's rounding, both ways

    @classmethod
    def build(cls, weight: torch.Tensor, full_head: Callable[[], torch.Tensor],
              softcap: float | None) -> ScreenedArgmax | None:
        """The screen of a (V, C) head, or None: not a float32 / float64 CPU head whose width
        the kernel takes, smaller than MIN_NUMBERS, or with weights that are not finite."""
        V, C = weight.shape
        if weight.dtype not in (torch.float32, torch.float64) or V * C < MIN_NUMBERS:
            return None
        if not _kernel_available(C, weight.device):
            return None
        screen = cls(weight, full_head, softcap)
        return screen if math.isfinite(screen.per_l2) else None  # inf / NaN weights

    def full(self, rows: torch.Tensor, vocab_limit: int | None = None) -> torch.Tensor:
        return full_argmax(rows, self.full_head(), self.softcap, vocab_limit)

    def _slack(self, norm: float | torch.Tensor, best: float | torch.Tensor):
        """Half the window below the best screened logit `best` (a float or a (B,) tensor)
        that can hold the argmax, for rows of L2 norm `norm` (see `__call__`)."""
        return (norm * self.per_l2 + abs(best) * self.per_logit) / (1 - 2 * self.per_logit)

    def screen(self, rows: torch.Tensor,
               vocab_limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) rows -> the (B, V') screened logits (bf16, ids below `vocab_limit`) and
        the rows' (B,) L2 norms: token j's fp32 logit z_j lies within
        |h|_2 per_l2 + per_logit |y_j| of its screened logit y_j (before soft-capping)."""
        rows_bf16 = rows.to(torch.bfloat16, memory_format=torch.contiguous_format)
        screened = torch._weight_int8pack_mm(rows_bf16, self.q, self.scales)  # (B, V) bf16
        # (B, V'): padding ids are never chosen
        return screened[:, :vocab_limit], torch.linalg.vector_norm(rows, dim=-1)

    def __call__(self, rows: torch.Tensor, vocab_limit: int | None = None) -> torch.Tensor:
        screened, l2 = self.screen(rows, vocab_limit)  # (B, V'), (B,)
        # With b_j = |h|_2 per_l2 + per_logit |y_j| the bound on token j and y_k the best
        # screened logit, token j can be the argmax only if y_j + b_j >= y_k - b_k. Every
        # token with y_j below y_k - 2 s, s = (|h|_2 per_l2 + per_logit |y_k|) / (1 - 2
        # per_logit), fails that (|y_j| <= |y_k| + 2 s where it matters): only y_k is needed.
        if rows.shape[0] == 1:  # one row: the threshold in Python numbers
            best, norm = screened.max().item(), l2.item()
            slack = self._slack(norm, best)
            if not math.isfinite(slack) or not math.isfinite(best):
                return self.full(rows, vocab_limit)
            threshold = best - 2 * slack
            # compared in bf16, the threshold rounds to the nearest bf16: lower it past that
            survivors = (screened[0] >= bf16_floor(threshold)).nonzero()[:, 0]
        else:
            best = screened.amax(dim=-1).to(l2.dtype)
            slack = self._slack(l2, best)
            if not bool(slack.isfinite().all()):
                return self.full(rows, vocab_limit)
            threshold = best - 2 * slack  # (B,)
            survivors = (screened >= threshold[:, None]).any(dim=0).nonzero()[:, 0]
        if not 0 < survivors.numel() <= self.max_survivors:
            return self.full(rows, vocab_limit)
        if survivors.numel() == 1 and not self.softcap:
            # every other logit is below it in any summation order: no tie to break, and
            # its exact logit is not needed (the cap could flatten a near one into a tie)
            return survivors.expand(rows.shape[0])
        # exact logits of the survivors, every row over all of them (any exact value is fair)
        exact = torch.mm(rows, self.weight.index_select(0, survivors).t())  # (B, n)
        if self.softcap:
            exact = soft_cap(exact, self.softcap)
            # the cap flattens large logits: a token ruled out (below threshold + slack)
            # could tie the best after it; then only the full head decides
            bound = threshold + slack  # raised past its rounding to the logits' dtype
            bound = bound + abs(bound) * 2.0 ** -20
            ceiling = soft_cap(torch.as_tensor(bound, dtype=exact.dtype), self.softcap)
            if bool((ceiling >= exact.amax(dim=-1)).any()):
                return self.full(rows, vocab_limit)
        top = exact.amax(dim=-1, keepdim=True)  # (B, 1): the best exact logit per row
        window = l2[:, None] * self.tie_per_l2 + self.tie_cap
        if bool(((exact >= top - window).sum(dim=-1) > 1).any()):
            return self.full(rows, vocab_limit)  # a (near) tie: the full head's order decides
        return survivors[exact.argmax(dim=-1)]
