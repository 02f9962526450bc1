"""Mixture of experts: shared experts, top-k routed experts, and load balancing.

Routing (per token, over the `n_exp - n_shared` routed experts):
- standard (aux_free false, DeepSeek-V2 style): scores s = softmax(router logits); the
  top-k experts by s run, weighted by their (unnormalised) s. Balancing loss, over the
  N tokens of the micro-batch: coeff * sum_i f_i * P_i with f_i = E/(k N) * #tokens routed
  to i and P_i = mean_t s_i,t.
- aux-loss-free (DeepSeek-V3 style): s = sigmoid(router logits); experts are picked by
  top-k of s + b (b: a per-expert bias used for selection only), gates are the unbiased s
  of the picked experts normalised to sum 1. After each optimisation step the trainer calls
  `update_bias(load)`: b += gamma * sign(mean load - load). A complementary sequence-wise
  loss alpha * mean_b sum_i f_i * P_i (f over the sequence's tokens, P from s normalised per
  token) keeps single sequences from collapsing.
k = n_act - n_shared; the n_shared shared experts run on every token (fused into one MLP of
width n_shared * up_dim, which equals the sum of n_shared separate MLPs).

Dispatch is batched: the (token, expert) pairs are sorted by expert so each expert runs
once on a contiguous slice (or all at once through `torch._grouped_mm`). A forward on a CPU
without gradients with fewer pairs than routed experts (a decoding step) multiplies each pair
on its own instead (`RoutedExperts.few_rows`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config.schema import BlockConfig
from .mlp import MLP, activate, up_features
from .recompute import is_recomputing

DISPATCH_METHODS = ("auto", "loop", "grouped_mm")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


# torch's grouped GEMM has a CPU kernel from 2.9 on (before, only CUDA's)
_CPU_GROUPED_MM = torch.torch_version.TorchVersion(torch.__version__) >= (2, 9)


def _grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Where `auto` uses torch's grouped GEMM (16-byte aligned rows in every case):
    - CUDA: bf16 (its kernel's and its compile-time shape function's need), sm90+;
    - CPU: fp32 or bf16, torch >= 2.9, not inside torch.compile (whose shape function
      takes bf16 only). Its loop over the groups runs in C++: against the `loop` below,
      a training step measured 0.98-0.99x (4 x 256 MoE, benchmarks/bench_model.py) and
      0.96x (2 x 128)."""
    aligned = all(n * x.element_size() % 16 == 0 for n in (x.shape[-1], w.shape[-1]))
    if not (aligned and hasattr(torch, "_grouped_mm")):
        return False
    if x.device.type == "cuda":
        return (x.dtype == torch.bfloat16
                and torch.cuda.get_device_capability(x.device) >= (9, 0))
    return (x.device.type == "cpu" and _CPU_GROUPED_MM
            and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.compiler.is_compiling())


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor,
                   method: str = "auto", row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of x sorted by group (counts[e] rows for group e) times w[e]: (N, K) -> (N, M),
    each output row times row_scale (N,) if given.

    `loop` runs one matmul per group on its contiguous slice; `grouped_mm` uses torch's
    grouped GEMM (torch >= 2.9 for a CPU kernel). `auto`: grouped_mm where
    `_grouped_mm_supported`, else the loop.
    """
    if method not in DISPATCH_METHODS:
        raise ValueError(f"unknown dispatch {method!r} (expected one of {DISPATCH_METHODS})")
    dtype = _compute_dtype(x)
    x, w = x.to(dtype), w.to(dtype)
    if row_scale is not None:
        row_scale = row_scale.to(dtype)
    if method == "auto":
        method = "grouped_mm" if _grouped_mm_supported(x, w) else "loop"
    if method == "grouped_mm":
        offsets = counts.cumsum(0).to(torch.int32)
        out = torch._grouped_mm(x, w, offs=offsets)
        return out if row_scale is None else out * row_scale[:, None]
    return _LoopGroupedMM.apply(x, w, row_scale, counts.tolist())


class _LoopGroupedMM(torch.autograd.Function):
    """One matmul per group, each writing its slice of one preallocated output (forward)
    or gradient (backward), with the row scale applied to the slice while it is in cache:
    no per-group results to concatenate, no per-expert gradients to stack, no extra pass
    over all the rows for the scale (autograd through split / matmul / cat / mul made each
    of those)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None,
                counts: list[int]) -> torch.Tensor:
        ctx.save_for_backward(x, w, scale)
        ctx.counts = counts
        out = x.new_empty((x.shape[0], w.shape[-1]))
        for e, rows in _filled_groups(counts):
            torch.mm(x[rows], w[e], out=out[rows])
            if scale is not None:
                out[rows].mul_(scale[rows, None])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w, scale = ctx.saved_tensors
        need_x, need_w, need_scale = ctx.needs_input_grad[:3]
        need_scale = need_scale and scale is not None
        grad = grad.contiguous()
        grad_x = torch.empty_like(x) if need_x or need_scale else None
        grad_w = torch.empty_like(w) if need_w else None
        grad_scale = torch.empty_like(scale) if need_scale else None
        if grad_w is not None:
            for e, n in enumerate(ctx.counts):
                if n == 0:  # an expert no token chose
                    grad_w[e].zero_()
        for e, rows in _filled_groups(ctx.counts):
            g_e, x_e = grad[rows], x[rows]
            if grad_x is not None:
                t = torch.mm(g_e, w[e].t(), out=grad_x[rows])  # (n, K): d out / d x, unscaled
                if need_scale:  # d out_i / d scale_i = (x_i w): sum_j g_ij (x_i w)_j = t_i . x_i
                    torch.sum(t * x_e, dim=-1, out=grad_scale[rows])
                if scale is not None:
                    t.mul_(scale[rows, None])
            if grad_w is not None:
                g_scaled = g_e if scale is None else g_e * scale[rows, None]
                torch.mm(x_e.t(), g_scaled, out=grad_w[e])
        return grad_x if need_x else None, grad_w, grad_scale, None


def _filled_groups(counts: list[int]):
    """(group, its row slice) of each group with at least one row: an empty group's
    products would only cost their calls."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


class RoutedExperts(nn.Module):
    """`n` MLP experts with stacked weights, run on tokens sorted by expert."""

    def __init__(self, n: int, n_embd: int, hidden: int, non_linearity: str,
                 dispatch: str = "auto"):
        super().__init__()
        if dispatch not in DISPATCH_METHODS:
            raise ValueError(f"unknown dispatch {dispatch!r} (expected one of "
                             f"{DISPATCH_METHODS})")
        self.non_linearity = non_linearity
        self.dispatch = dispatch  # see grouped_matmul
        self.w_up = nn.Parameter(torch.empty(n, n_embd, up_features(hidden, non_linearity)))
        self.w_down = nn.Parameter(torch.empty(n, hidden, n_embd))
        self.w_down.residual_out = True  # GPT-2 scaled init

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor,
                counts: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, C); expert_idx, gates (N, k); counts (n,) = pairs per expert -> (N, C):
        base (N, C) (e.g. the shared experts' output; zeros if None) plus the gated sum."""
        N, k = expert_idx.shape
        order = expert_idx.reshape(-1).argsort(stable=True)  # (N * k) pairs sorted by expert
        token = order // k  # the token of each sorted pair
        xs = x.index_select(0, token)  # (N * k, C)
        h = activate(grouped_matmul(xs, self.w_up, counts, self.dispatch), self.non_linearity)
        pair_gates = gates.reshape(-1).index_select(0, order)  # (N * k,)
        ys = grouped_matmul(h, self.w_down, counts, self.dispatch, pair_gates)  # (N * k, C)
        # the gated pairs summed into their tokens (index_add, and its gradient index_select,
        # are plain row loops; index_copy + bmm with the gates cost more here)
        if base is None:
            return ys.new_zeros((N, ys.shape[-1])).index_add_(0, token, ys)
        return base.to(ys.dtype).index_add(0, token, ys)

    def few_rows(self, x: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor,
                 base: torch.Tensor | None = None) -> torch.Tensor:
        """forward's sum for a few rows, most experts idle (a decoding step), without the
        sort, gather, combine and a product per expert: each (row, expert) pair multiplied
        on its own and added in forward's order (by expert), so the same numbers come out
        for one row. No gradients."""
        dtype = _compute_dtype(x)
        x = x.to(dtype)
        out = (x.new_zeros((x.shape[0], self.w_down.shape[-1])) if base is None
               else base.to(dtype, copy=True))  # (N, C)
        up = x.new_empty((expert_idx.shape[1], self.w_up.shape[-1]))  # (k, up)
        for t, (experts, row_gates) in enumerate(zip(expert_idx.tolist(),
                                                     gates.to(dtype).tolist(), strict=True)):
            pairs = sorted(zip(experts, row_gates, strict=True))
            for j, (e, _) in enumerate(pairs):
                torch.mm(x[t:t + 1], self.w_up[e].to(dtype), out=up[j:j + 1])
            h = activate(up, self.non_linearity)  # one call for the row's k experts
            for j, (e, gate) in enumerate(pairs):
                out[t:t + 1].add_(torch.mm(h[j:j + 1], self.w_down[e].to(dtype)).mul_(gate))
        return out


class MoE(nn.Module):
    def __init__(self, block: BlockConfig, n_embd: int, dropout: float, dispatch: str = "auto"):
        super().__init__()
        if block.n_exp is None or block.n_shared is None or block.n_act is None:
            raise ValueError("moe needs n_exp, n_shared and n_act")
        self.n_routed = block.n_exp - block.n_shared
        self.top_k = block.n_act - block.n_shared
        self.aux_free = block.aux_free
        self.coeff = block.coeff or 0.0
        self.alpha = block.alpha or 0.0
        self.gamma = block.gamma or 0.0
        self.router = nn.Linear(n_embd, self.n_routed, bias=False)
        self.experts = RoutedExperts(self.n_routed, n_embd, block.up_dim, block.non_linearity,
                                     dispatch)
        self.shared = (MLP(n_embd, block.n_shared * block.up_dim, block.non_linearity)
                       if block.n_shared else None)
        if self.aux_free:  # persistent: saved in checkpoints so a resume routes identically
            self.register_buffer("expert_bias", torch.zeros(self.n_routed))
        self.drop = nn.Dropout(dropout)
        # Tokens routed to each expert since the last bias update. A plain attribute, not a
        # buffer: DDP broadcasts buffers from rank 0 on every forward.
        self.load: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> scores (N, E) float32, chosen experts (N, k), gates (N, k)."""
        logits = self.router(x).float()  # (N, E)
        if self.aux_free:
            scores = torch.sigmoid(logits)
            expert_idx = (scores + self.expert_bias).topk(self.top_k, dim=-1).indices
            gates = scores.gather(-1, expert_idx)
            gates = gates / gates.sum(-1, keepdim=True)
        else:
            scores = torch.softmax(logits, dim=-1)
            gates, expert_idx = scores.topk(self.top_k, dim=-1)
        return scores, expert_idx, gates

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> (output (B, T, C), auxiliary loss (0-dim))."""
        B, T, C = x.shape
        flat = x.reshape(B * T, C)
        scores, expert_idx, gates = self.route(flat)
        shared = self.shared(flat) if self.shared is not None else None
        # a decoding step on a CPU (on CUDA reading the routing back would stall the stream)
        if (not self.training and not torch.is_grad_enabled() and x.device.type == "cpu"
                and B * T * self.top_k <= self.n_routed):
            y = self.experts.few_rows(flat, expert_idx, gates, base=shared)  # (N, C)
            return self.drop(y.view(B, T, C)), scores.new_zeros(())
        counts = torch.bincount(expert_idx.reshape(-1), minlength=self.n_routed)  # (E,)
        y = self.experts(flat, expert_idx, gates, counts, base=shared)  # (N, C)
        if self.training and torch.is_grad_enabled() and not is_recomputing():
            self._count(counts)
        aux = (self._aux_loss(scores, expert_idx, counts, B, T) if self.training
               else scores.new_zeros(()))
        return self.drop(y.view(B, T, C)), aux

    def _aux_loss(self, scores: torch.Tensor, expert_idx: torch.Tensor, counts: torch.Tensor,
                  B: int, T: int) -> torch.Tensor:
        E, k = self.n_routed, self.top_k
        if not self.aux_free:
            f = counts.float() * (E / (k * B * T))  # (E,)
            return self.coeff * (f * scores.mean(0)).sum()
        per_seq = torch.zeros(B, E, device=scores.device)
        per_seq.scatter_add_(1, expert_idx.view(B, T * k),
                             torch.ones(B, T * k, device=scores.device))
        f = per_seq * (E / (k * T))  # (B, E)
        p = (scores / scores.sum(-1, keepdim=True)).view(B, T, E).mean(1)  # (B, E)
        return self.alpha * (f * p).sum(-1).mean()

    # ------------------------------------------------------------ load balancing state

    def _count(self, counts: torch.Tensor) -> None:
        if self.load is None or self.load.device != counts.device:
            self.load = torch.zeros(self.n_routed, device=counts.device)
        self.load += counts.float()

    def load_counts(self) -> torch.Tensor:
        """Tokens routed to each routed expert since the last reset, float32 (n_routed,)."""
        if self.load is None:
            return torch.zeros(self.n_routed, device=self.router.weight.device)
        return self.load.clone()

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """Aux-free step: raise the bias of under-loaded experts, lower over-loaded ones."""
        if self.aux_free:
            load = load.to(self.expert_bias.device, torch.float32)
            self.expert_bias += self.gamma * torch.sign(load.mean() - load)
        self.load = None
