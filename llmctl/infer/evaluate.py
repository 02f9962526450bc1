"""Loss of a model on token data: the trainer's sampled estimate and exact whole-split passes.

All losses here are the language-model cross-entropy (nats per token) computed from the
logits, without any MoE auxiliary term, so `exp(loss)` is a perplexity.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..core.errors import LlmctlError

if TYPE_CHECKING:
    import torch

    from .load import LoadedCheckpoint

SPLITS = ("train", "val")


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


# ------------------------------------------------------------------------ llmctl eval


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two tokenizer specs give the same token ids (file locations do not matter)."""
    if a.get("kind") != b.get("kind"):
        return False
    if a.get("kind") == "char":
        return a.get("chars") == b.get("chars")
    if a.get("kind") == "tiktoken":
        if a.get("sha256") and b.get("sha256"):
            keys = ("sha256", "pat_str", "special_tokens")
            return all(a.get(k) == b.get(k) for k in keys)
        return a.get("name") == b.get("name")
    return True  # byte


@dataclass
class EvalRequest:
    """What `llmctl eval` evaluates; None means the checkpoint's own training setting."""

    dataset: str | None = None
    data_dir: str | None = None
    split: str = "val"
    text_file: str | None = None
    full: bool = False
    eval_iters: int | None = None
    batch_size: int | None = None
    seed: int | None = None

    def check(self) -> None:
        if self.split not in SPLITS:
            from ..core.errors import one_of

            raise LlmctlError(f"--split: {one_of(self.split, SPLITS)}")
        if self.text_file is not None:
            given = [flag for flag, value in (("--dataset", self.dataset),
                                              ("--data_dir", self.data_dir),
                                              ("--eval_iters", self.eval_iters),
                                              ("--seed", self.seed)) if value is not None]
            if given:
                raise LlmctlError(f"--text evaluates a whole file; {', '.join(given)} "
                                  "apply to datasets only")
        if self.full and (self.eval_iters is not None or self.seed is not None):
            raise LlmctlError("--full walks the whole split; --eval_iters / --seed are for the "
                              "random-batch estimate")


@dataclass
class EvalReport:
    checkpoint: str
    step: int
    source: str  # "dataset shakespeare (val) in data" or "text notes.txt"
    method: str  # how the tokens were chosen
    loss: float
    perplexity: float
    tokens: int
    batch_size: int
    block_size: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def evaluate_checkpoint(loaded: LoadedCheckpoint, request: EvalRequest) -> EvalReport:
    """Loss and perplexity of a loaded checkpoint on a dataset split or a text file."""
    import numpy as np

    request.check()
    info, model = loaded.info, loaded.model
    train = info.run.train
    block_size = loaded.block_size
    # the trainer's eval covers batch_size windows per rank: the run's whole world's worth
    batch_size = request.batch_size or train.batch_size * _trained_world_size(info.path)
    autocast = loaded.precision.autocast
    start = time.perf_counter()
    if request.text_file is not None:
        text = _read_text(request.text_file)
        ids = np.asarray(loaded.tokenizer.encode(text), dtype=np.int64)
        result = full_split_loss(model, ids, block_size, batch_size, autocast(),
                                 name=f"text file {request.text_file}")
        source, method = f"text {request.text_file}", "whole text, block_size windows"
    else:
        dataset = _open_dataset(loaded, request.dataset or train.dataset,
                                request.data_dir or train.data_dir)
        tokens = dataset.tokens(request.split)
        name = dataset.folder.name
        source = f"dataset {name} ({request.split}) in {dataset.folder.parent}"
        if request.full:
            result = full_split_loss(model, tokens, block_size, batch_size, autocast(),
                                     name=f"split {request.split!r} of dataset {name}")
            method = "whole split, block_size windows"
        else:
            iters = request.eval_iters or train.eval_iters
            # the trainer's seeds (seed + 1 for train, + 2 for val): the same batches it saw
            seed = request.seed if request.seed is not None else (
                train.seed + 1 + SPLITS.index(request.split))
            sampler = dataset.random_batches(request.split, batch_size, block_size, seed)
            loss = estimate_loss(model, sampler, iters, autocast())
            result = LossResult(loss=loss, tokens=iters * batch_size * block_size)
            method = f"{iters} random batches, seed {seed}"
    return EvalReport(checkpoint=str(info.path), step=info.step, source=source, method=method,
                      loss=result.loss, perplexity=result.perplexity, tokens=result.tokens,
                      batch_size=batch_size, block_size=block_size,
                      seconds=time.perf_counter() - start)


def _trained_world_size(folder: Path) -> int:
    """Data-parallel processes the checkpoint was trained with (1 when not recorded)."""
    import json

    from ..runtime.checkpoint import TRAINER_STATE

    try:
        value = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))["world_size"]
        return value if isinstance(value, int) and value >= 1 else 1
    except (OSError, ValueError, KeyError, TypeError):
        return 1


def _read_text(path: str) -> str:
    from .load import read_text_file

    text = read_text_file(path, "text file")
    if not text:
        raise LlmctlError(f"text file {path} is empty")
    return text


def _open_dataset(loaded: LoadedCheckpoint, name: str, data_dir: str) -> Any:
    """The prepared dataset, refused unless it was tokenized as the checkpoint was trained."""
    from ..data.loader import PreparedDataset
    from ..data.tokenizers import describe_spec

    dataset = PreparedDataset.open(data_dir, name)
    ours = loaded.info.tokenizer or {}
    if not same_tokenizer(dataset.tokenizer_spec, ours):
        raise LlmctlError(
            f"dataset {name} in {data_dir} was tokenized with "
            f"{describe_spec(dataset.tokenizer_spec)}, but the checkpoint uses "
            f"{describe_spec(ours)}: its token ids mean different text to this model; prepare "
            f"the data with the checkpoint's tokenizer or evaluate raw text with --text FILE")
    dataset.check_vocab(loaded.info.run.model.vocab_size)
    return dataset
