"""`llmctl eval`: the loss and perplexity of a checkpoint on a dataset split or a text file."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import LlmctlError
from ..runtime.loss import SPLITS, LossResult, estimate_loss, eval_seed, full_split_loss

if TYPE_CHECKING:
    from .load import LoadedCheckpoint


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
        _check_memory(loaded, _windows_per_batch(len(ids), block_size, batch_size))
        result = full_split_loss(model, ids, block_size, batch_size, autocast(),
                                 name=f"text file {request.text_file}")
        source, method = f"text {request.text_file}", "whole text, block_size windows"
    else:
        dataset = _open_dataset(loaded, request.dataset or train.dataset,
                                request.data_dir or train.data_dir)
        tokens = dataset.tokens(request.split)
        name = dataset.folder.name
        source = f"dataset {name} ({request.split}) in {dataset.folder.parent}"
        if request.full and dataset.is_chat:
            raise LlmctlError(f"dataset {name} is chat data: --full walks token windows and "
                              "would score the user's turns too; evaluate it with random "
                              "conversation batches (drop --full)")
        if request.full:
            _check_memory(loaded, _windows_per_batch(len(tokens), block_size, batch_size))
            result = full_split_loss(model, tokens, block_size, batch_size, autocast(),
                                     name=f"split {request.split!r} of dataset {name}")
            method = "whole split, block_size windows"
        else:
            iters = request.eval_iters or train.eval_iters
            # the trainer's seeds: the same batches it saw
            seed = (request.seed if request.seed is not None
                    else eval_seed(train.seed, request.split))
            _check_memory(loaded, batch_size)
            sampler = dataset.random_batches(request.split, batch_size, block_size, seed)
            loss = estimate_loss(model, sampler, iters, autocast())
            result = LossResult(loss=loss, tokens=iters * batch_size * block_size)
            method = f"{iters} random batches, seed {seed}"
    return EvalReport(checkpoint=str(info.path), step=info.step, source=source, method=method,
                      loss=result.loss, perplexity=result.perplexity, tokens=result.tokens,
                      batch_size=batch_size, block_size=block_size,
                      seconds=time.perf_counter() - start)


def _windows_per_batch(num_tokens: int, block_size: int, batch_size: int) -> int:
    """The largest batch a whole-sequence pass builds: no more windows than there are."""
    return max(1, min(batch_size, (num_tokens - 1) // block_size))


def _check_memory(loaded: LoadedCheckpoint, batch_size: int) -> None:
    """Refuse a batch whose forward pass would not fit, before it is attempted."""
    from ..model.costs import inference_bytes
    from ..runtime.device import check_fits

    need = inference_bytes(loaded.info.run.model, batch_size, loaded.block_size,
                           act_bytes=loaded.precision.dtype.itemsize)
    check_fits(need, loaded.device, f"eval with --batch_size {batch_size} (× block_size "
               f"{loaded.block_size})", "use a smaller --batch_size")


def _trained_world_size(folder: Path) -> int:
    """Data-parallel processes the checkpoint was trained with (1 when not recorded)."""
    from ..runtime.checkpoint import read_trainer_state

    state = read_trainer_state(folder)  # validated: world_size is an int >= 1 if present
    return int(state.get("world_size", 1)) if state else 1


def _read_text(path: str) -> str:
    from ..core.files import EVAL_TEXT_LIMIT, read_user_file

    # held whole (then tokenized); a larger corpus is `prepare`d and evaluated as a dataset
    text = read_user_file(path, "text file", EVAL_TEXT_LIMIT)
    if not text:
        raise LlmctlError(f"text file {path} is empty")
    return text


def _open_dataset(loaded: LoadedCheckpoint, name: str, data_dir: str) -> Any:
    """The prepared dataset, refused unless it was tokenized as the checkpoint was trained."""
    from ..data.loader import PreparedDataset
    from ..data.tokenizers import describe_spec, same_tokenizer

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
