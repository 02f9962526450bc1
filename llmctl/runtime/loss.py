"""Loss of a model on token data: the trainer's sampled estimate and exact whole-split passes.

All losses here are the language-model cross-entropy (nats per token) computed from the
logits, without any MoE auxiliary term, so `exp(loss)` is a perplexity.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..core.errors import LlmctlError

if TYPE_CHECKING:
    import torch

SPLITS = ("train", "val")


def eval_seed(seed: int, split: str) -> int:
    """The seed of the periodic eval's batches of `split` (seed + 1 for train, + 2 for val):
    every evaluation of a run sees the same batches, and `llmctl eval` can draw them again."""
    return seed + 1 + SPLITS.index(split)


class BatchSampler(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class LossResult:
    """Mean cross-entropy over `tokens` predicted tokens."""

    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf


def _model_device(model: torch.nn.Module) -> torch.device:
    import torch

    return next(model.parameters(), torch.empty(0)).device


def _loss_sum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
              autocast_ctx: AbstractContextManager | None) -> torch.Tensor:
    """Summed cross-entropy over the targets that are not -1, as a 0-dim tensor on the device."""
    import torch.nn.functional as F

    with autocast_ctx if autocast_ctx is not None else nullcontext():
        logits = model(x, use_cache=False).logits  # (B, T, V); the loss is computed below
    # fp32 log-softmax: in bf16/fp16 the log-sum-exp over a large vocabulary loses digits
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1,
                           reduction="sum")


class _EvalMode:
    """no_grad + eval mode for the duration, the previous train/eval mode restored after."""

    def __init__(self, model: torch.nn.Module):
        import torch

        self.model, self.no_grad = model, torch.no_grad()

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def estimate_loss(model: torch.nn.Module, sampler: BatchSampler, iters: int,
                  autocast_ctx: AbstractContextManager | None = None) -> float:
    """Mean loss over `iters` batches of `sampler.next_batch()` (the trainer's eval estimate).

    Runs under no_grad with the model in eval mode; its previous mode is restored. Each batch
    counts equally (they have equal shapes), as in the reference's estimate.
    """
    if iters < 1:
        raise LlmctlError(f"eval_iters must be at least 1, got {iters}")
    device = _model_device(model)
    total = None
    with _EvalMode(model):
        for _ in range(iters):
            x, y = sampler.next_batch()
            count = max(int((y != -1).sum()), 1)  # counted on the host: no device sync
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            batch_loss = _loss_sum(model, x, y, autocast_ctx) / count
            # summed on the device: one host sync at the end instead of one per batch
            total = batch_loss if total is None else total + batch_loss
    return float(total) / iters


def full_split_loss(model: torch.nn.Module, tokens: Any, block_size: int, batch_size: int,
                    autocast_ctx: AbstractContextManager | None = None,
                    name: str = "the text") -> LossResult:
    """Exact mean loss over a whole token sequence (`llmctl eval --full`).

    Deterministic: non-overlapping block_size windows, no sampling; every token after the
    first is predicted exactly once and weighs the same (a short last window counts for its
    own tokens only). `tokens` is any 1-D integer array (a split's memmap, encoded text).
    """
    from ..data.loader import SequentialBatches

    if len(tokens) < 2:
        raise LlmctlError(f"{name} has {len(tokens)} token(s); need at least 2 to evaluate")
    device = _model_device(model)
    total, count = None, 0
    with _EvalMode(model):
        for x, y in SequentialBatches(tokens, batch_size, block_size, name=name):
            count += int((y != -1).sum())
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss_sum = _loss_sum(model, x, y, autocast_ctx).double()
            total = loss_sum if total is None else total + loss_sum
    return LossResult(loss=float(total) / count, tokens=count)
