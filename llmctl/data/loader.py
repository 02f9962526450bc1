"""Reading a prepared dataset: memory-mapped splits, random training windows, eval windows.

Random windows are a pure function of (seed, global sample index): sample j of the run is
the window starting at `hash(seed, j) mod (N - block_size)`. Every data-parallel rank uses
the same seed and, on each call, takes its own rows of the *global* batch of
`world_size * batch_size` samples (rank r: rows r*B .. (r+1)*B-1). So ranks see different
data, and the windows of an optimisation step depend only on the total batch, not on how it
is split over ranks and gradient-accumulation micro-steps: a 2-rank run sees exactly the
windows of a 1-rank run with the same total batch, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import LlmctlError
from . import layout
from .tokenizer_base import read_spec_file
from .tokenizers import Tokenizer, tokenizer_files, tokenizer_from_spec

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixed hash of uint64 values."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def window_starts(seed: int, sample_indices: np.ndarray, num_starts: int) -> np.ndarray:
    """Start offsets in [0, num_starts) of the given global samples of a seeded run."""
    key = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        z = key + (sample_indices.astype(np.uint64) + np.uint64(1)) * _GOLDEN
    return (_mix64(z) % np.uint64(num_starts)).astype(np.int64)


def _map(kind: type, path: Path, dtype: np.dtype, count: int, split: str) -> np.ndarray:
    """`count` items of `path`, memory-mapped read-only; a map the address space cannot
    hold (`ulimit -v`) is a message naming the file."""
    try:
        return kind(path, dtype=dtype, mode="r", shape=(count,))
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise LlmctlError(f"{path} ({split} split, {count * dtype.itemsize:,} bytes) cannot be "
                          f"memory-mapped: {reason}; raise the address-space limit "
                          "(`ulimit -v`) or prepare less data") from None


def _too_small(name: str, tokens: int, block_size: int) -> LlmctlError:
    return LlmctlError(f"{name} has {tokens:,} tokens, too few for block_size {block_size} "
                       f"(needs at least {block_size + 1}); prepare more data or lower "
                       "block_size")


class SplitTokens(np.memmap):
    """A split's tokens, memory-mapped, knowing the largest id its meta.json allows.

    Batch cutters check every batch against `max_id` (the max of a (B, T) batch costs
    microseconds), so a corrupted or swapped file is a message naming it, not an IndexError
    deep inside the embedding; the file itself is never read whole at start.
    """

    max_id: int | None = None
    fix: str = ""  # what to do about a bad id, for the message


def _check_ids(tokens: np.ndarray, batch: np.ndarray) -> None:
    limit = getattr(tokens, "max_id", None)
    if limit is not None and batch.size and (top := int(batch.max())) > limit:
        raise LlmctlError(f"{tokens.filename} holds token id {top}, but its meta.json allows "
                          f"ids up to {limit}: {tokens.fix}")


def _to_tensors(windows: np.ndarray, tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 tensors from windows of T+1 tokens of `tokens`: y is x shifted by one."""
    _check_ids(tokens, windows)
    windows = windows.astype(np.int64)  # (B, T+1)
    x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))  # (B, T)
    y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))  # (B, T)
    return x, y


class RandomBatchSampler:
    """Seeded random windows of one split; `next_batch()` -> (x, y), int64 of shape (B, T).

    The state (`state_dict`) is JSON: the seed and how many global samples were drawn.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, name: str = "split") -> None:
        if batch_size < 1 or block_size < 1:
            raise LlmctlError(f"batch_size ({batch_size}) and block_size ({block_size}) must be "
                              "positive")
        if not 0 <= rank < world_size:
            raise LlmctlError(f"rank {rank} is not in 0..world_size-1 ({world_size})")
        if len(tokens) < block_size + 1:
            raise _too_small(name, len(tokens), block_size)
        self.tokens, self.name = tokens, name
        self.batch_size, self.block_size = batch_size, block_size
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.samples_drawn = 0  # global samples (all ranks) drawn so far
        # Row i is tokens[i : i + T + 1]; a view, nothing is read until indexed.
        self._windows = np.lib.stride_tricks.sliding_window_view(tokens, block_size + 1)

    @property
    def num_starts(self) -> int:
        return len(self.tokens) - self.block_size

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def starts(self) -> np.ndarray:
        """This rank's window starts for the next call (without advancing)."""
        first = self.samples_drawn + self.rank * self.batch_size
        return window_starts(self.seed, np.arange(first, first + self.batch_size),
                             self.num_starts)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.starts()
        self.samples_drawn += self.global_batch
        return _to_tensors(self._windows[starts], self.tokens)  # one gather, no row loop

    def state_dict(self) -> dict[str, Any]:
        return _sampler_state(self, "random_windows")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where `state` left off; refuses the state of another dataset or window size."""
        _load_sampler_state(self, state, "random_windows", "not a random-window sampler state")


class ChatBatchSampler:
    """Seeded random whole conversations of a chat split, one per row, padded (not packed).

    Sample j of the run is conversation `hash(seed, j) mod n`; it starts at position 0 of
    its row and is cut at block_size + 1 tokens when longer. Targets are -1 (ignored by
    the loss) where the mask says "not a target" (system / user turns, role tokens) and on
    the padding; inputs are padded with end-of-text. Same state format as the window
    sampler, so resume works alike.
    """

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, offsets: np.ndarray,
                 batch_size: int, block_size: int, seed: int, pad_id: int, rank: int = 0,
                 world_size: int = 1, name: str = "split") -> None:
        if batch_size < 1 or block_size < 1:
            raise LlmctlError(f"batch_size ({batch_size}) and block_size ({block_size}) must be "
                              "positive")
        if len(offsets) < 2:
            raise LlmctlError(f"{name} has no conversations; prepare more chat data")
        self.tokens, self.mask, self.offsets, self.name = tokens, mask, offsets, name
        self.batch_size, self.block_size, self.pad_id = batch_size, block_size, pad_id
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.samples_drawn = 0
        self._check_targets()

    def _check_targets(self, probes: int = 1024) -> None:
        """Refuse a split most of whose conversations hold no target within block_size: a
        batch of those leaves the loss nothing (its mean over no tokens is NaN)."""
        picked = np.unique(np.linspace(0, self.num_conversations - 1, probes).astype(np.int64))
        useful = 0
        for c in picked:
            start = int(self.offsets[c])
            end = min(int(self.offsets[c + 1]), start + self.block_size + 1)
            useful += bool(np.asarray(self.mask[start + 1:end]).any())
        if 2 * useful < len(picked):
            raise LlmctlError(f"{self.name}: only {useful} of {len(picked)} conversations have "
                              f"an assistant token within their first block_size="
                              f"{self.block_size} tokens, so most batches have nothing to "
                              "learn; use a larger --block_size or shorter system / user turns")

    @property
    def num_conversations(self) -> int:
        return len(self.offsets) - 1

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def conversations(self) -> np.ndarray:
        """This rank's conversation indices for the next call (without advancing)."""
        first = self.samples_drawn + self.rank * self.batch_size
        return window_starts(self.seed, np.arange(first, first + self.batch_size),
                             self.num_conversations)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        picked = self.conversations()
        self.samples_drawn += self.global_batch
        return self.rows(picked)

    def rows(self, picked: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the given conversations, each padded / cut to block_size."""
        T = self.block_size
        x = np.full((len(picked), T), self.pad_id, dtype=np.int64)  # (B, T)
        y = np.full((len(picked), T), -1, dtype=np.int64)  # (B, T)
        for row, c in enumerate(picked):
            start = int(self.offsets[c])
            end = min(int(self.offsets[c + 1]), start + T + 1)
            ids = np.asarray(self.tokens[start:end], dtype=np.int64)
            keep = np.asarray(self.mask[start + 1:end], dtype=bool)
            n = len(ids) - 1
            x[row, :n] = ids[:-1]
            y[row, :n] = np.where(keep, ids[1:], -1)
        _check_ids(self.tokens, np.maximum(x, y))
        return torch.from_numpy(x), torch.from_numpy(y)

    def state_dict(self) -> dict[str, Any]:
        return _sampler_state(self, "chat_conversations")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _load_sampler_state(self, state, "chat_conversations",
                            "not a chat sampler state (the run used another kind of dataset)")


def _sampler_state(sampler: Any, kind: str) -> dict[str, Any]:
    """What a seeded batch sampler needs to resume: its seed and samples drawn, plus the
    shape of the data it drew from (checked on load)."""
    return {"kind": kind, "version": 1, "seed": sampler.seed,
            "samples_drawn": sampler.samples_drawn, "batch_size": sampler.batch_size,
            "block_size": sampler.block_size, "world_size": sampler.world_size,
            "num_tokens": int(len(sampler.tokens))}


def _load_sampler_state(sampler: Any, state: dict[str, Any], kind: str, wrong_kind: str) -> None:
    if not isinstance(state, dict) or state.get("kind") != kind:
        raise LlmctlError(wrong_kind)
    for key, ours in (("num_tokens", len(sampler.tokens)), ("block_size", sampler.block_size)):
        if state.get(key) != ours:
            raise LlmctlError(f"sampler state is for {key}={state.get(key)}, but {sampler.name} "
                              f"has {key}={ours}: resume with the same dataset and block_size")
    sampler.seed = int(state["seed"])
    sampler.samples_drawn = int(state["samples_drawn"])


class SequentialBatches:
    """Every token of a split, in non-overlapping windows of block_size, for a full eval.

    Window i covers inputs tokens[i*T : i*T+T] and targets one further; every token after the
    first is a target exactly once. The N-1 targets rarely divide by T: the remainder r forms
    a last, shorter window that comes alone as a (1, r) batch, after the (<= B, T) batches.
    With world_size > 1, rank r takes windows r, r + world_size, ... (tail included).
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, rank: int = 0,
                 world_size: int = 1, name: str = "split") -> None:
        if batch_size < 1 or block_size < 1:
            raise LlmctlError(f"batch_size ({batch_size}) and block_size ({block_size}) must be "
                              "positive")
        if not 0 <= rank < world_size:
            raise LlmctlError(f"rank {rank} is not in 0..world_size-1 ({world_size})")
        if len(tokens) < 2:
            raise _too_small(name, len(tokens), 1)
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        targets = len(tokens) - 1
        self.num_full, self.tail = divmod(targets, block_size)
        count = self.num_full + (1 if self.tail else 0)
        self._mine = np.arange(rank, count, world_size)  # this rank's window indices
        self._full = self._mine[self._mine < self.num_full]
        self._has_tail = bool(self.tail) and (self._mine == self.num_full).any()

    @property
    def num_targets(self) -> int:
        """Target tokens this rank's batches hold (all ranks together: N - 1)."""
        return len(self._full) * self.block_size + (self.tail if self._has_tail else 0)

    def __len__(self) -> int:
        return -(-len(self._full) // self.batch_size) + int(self._has_tail)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        T = self.block_size
        if len(self._full):
            windows = np.lib.stride_tricks.sliding_window_view(self.tokens, T + 1)
            for first in range(0, len(self._full), self.batch_size):
                starts = self._full[first:first + self.batch_size] * T
                yield _to_tensors(windows[starts], self.tokens)
        if self._has_tail:
            start = self.num_full * T
            yield _to_tensors(np.asarray(self.tokens[start:start + self.tail + 1])[None],
                              self.tokens)


class PreparedDataset:
    """A prepared dataset folder: meta.json, memory-mapped splits and its tokenizer."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise LlmctlError(f"dataset folder {self.folder} does not exist; run "
                              f"`{layout.prepare_hint(self.folder.name, self.folder.parent)}`")
        self.meta = layout.read_meta(self.folder)
        layout.check_split_files(self.folder, self.meta)
        self._check_tokenizer_files()
        self._maps: dict[str, np.ndarray] = {}

    @classmethod
    def open(cls, data_dir: str | Path, name: str) -> PreparedDataset:
        """DATA_DIR/NAME, with a message naming the prepare command when it is missing."""
        folder = Path(data_dir) / name
        if not folder.is_dir():
            raise LlmctlError(f"dataset {name!r} is not prepared in {data_dir}: run "
                              f"`{layout.prepare_hint(name, data_dir)}` first")
        return cls(folder)

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.folder.name))

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (the model's vocab_size may be larger)."""
        return int(self.meta["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.meta["eot_id"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"]).newbyteorder("<")

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    @property
    def tokenizer_spec(self) -> dict[str, Any]:
        return self.meta["tokenizer"]

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return tokenizer_from_spec(self.tokenizer_spec, self.folder)

    def tokenizer_files(self) -> list[Path]:
        """Files beside meta.json the tokenizer needs (to copy into checkpoints)."""
        return [self.folder / rel for rel in tokenizer_files(self.tokenizer_spec)]

    def _check_tokenizer_files(self) -> None:
        """The tokenizer's files are regular, bounded and match their sha256 now: training
        copies them into its checkpoints only when it saves, after all the work."""
        if tokenizer_files(self.tokenizer_spec):
            try:
                read_spec_file(self.tokenizer_spec, self.folder, self.tokenizer_spec["kind"])
            except LlmctlError as err:
                raise LlmctlError(f"{err}; {self._redo}") from None

    @property
    def _redo(self) -> str:
        return f"run `{layout.prepare_hint(self.folder.name, self.folder.parent)} --force`"

    @property
    def max_token_id(self) -> int:
        if "max_token_id" in self.meta:
            return int(self.meta["max_token_id"])
        return max(int(self.tokens(split).max()) for split in self.splits)  # older metas

    def num_tokens(self, split: str) -> int:
        return int(self._entry(split)["tokens"])

    def _entry(self, split: str) -> dict[str, Any]:
        if split not in self.meta["splits"]:
            raise LlmctlError(f"dataset {self.name} has no split {split!r} (splits: "
                              f"{', '.join(self.splits)})")
        return self.meta["splits"][split]

    def tokens(self, split: str) -> np.ndarray:
        """The split's tokens, memory-mapped read-only (nothing is read until indexed)."""
        if split not in self._maps:
            entry = self._entry(split)
            path = self.folder / entry["file"]
            if entry["tokens"] == 0:
                self._maps[split] = np.empty(0, dtype=self.dtype)
            else:
                tokens = _map(SplitTokens, path, self.dtype, entry["tokens"], split)
                # older metas lack it; check_vocab scans their splits whole instead
                tokens.max_id = self.meta.get("max_token_id")
                tokens.fix = (f"the file was changed or corrupted (the vocabulary has "
                              f"{self.vocab_size} tokens); {self._redo}")
                self._maps[split] = tokens
        return self._maps[split]

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse a model whose vocab_size cannot embed every token id of this dataset."""
        if self.max_token_id >= vocab_size:
            raise LlmctlError(
                f"dataset {self.name} has token ids up to {self.max_token_id} (tokenizer "
                f"{self.tokenizer_spec.get('kind')}, vocabulary {self.vocab_size}), but the "
                f"model's vocab_size is {vocab_size}; set vocab_size to at least "
                f"{self.max_token_id + 1}")

    @property
    def is_chat(self) -> bool:
        return self.meta.get("data_format") == "chat"

    def _side_file(self, split: str, key: str, dtype: str) -> np.ndarray:
        entry = self._entry(split)
        path = self.folder / entry[key]
        count = entry["tokens"] if key == "mask" else entry["conversations"] + 1
        try:
            if path.stat().st_size != count * np.dtype(dtype).itemsize:
                raise LlmctlError(f"{path} does not match meta.json (truncated or replaced); "
                                  f"run `{layout.prepare_hint(self.name, self.folder.parent)}"
                                  " --force`")
        except FileNotFoundError:
            raise LlmctlError(f"{path} ({split} {key}) is missing") from None
        return _map(np.memmap, path, np.dtype(dtype).newbyteorder("<"), count, split)

    def loss_mask(self, split: str) -> np.ndarray:
        """Chat data: 1 where the token is a training target (assistant content, end-of-turn)."""
        return self._side_file(split, "mask", "uint8")

    def conversation_offsets(self, split: str) -> np.ndarray:
        """Conversation boundaries, checked to run from 0 up to the token count, each
        conversation at least one token (in blocks: an offsets file is never held whole)."""
        offsets = self._side_file(split, "offsets", "uint64")
        tokens, block = self.num_tokens(split), 1 << 20
        bad = int(offsets[0]) != 0 or int(offsets[-1]) != tokens
        for first in range(0, len(offsets) - 1, block):
            if bad:
                break
            chunk = np.asarray(offsets[first:first + block + 1])
            bad = bool((chunk[1:] <= chunk[:-1]).any())  # not np.diff: uint64 wraps
        if bad:
            raise LlmctlError(f"{offsets.filename} is not a list of conversation boundaries "
                              f"rising from 0 to {tokens} (the split's tokens): the file was "
                              f"changed or corrupted; {self._redo}")
        return offsets

    def random_batches(self, split: str, batch_size: int, block_size: int, seed: int,
                       rank: int = 0, world_size: int = 1,
                       ) -> RandomBatchSampler | ChatBatchSampler:
        if self.is_chat:
            return ChatBatchSampler(self.tokens(split), self.loss_mask(split),
                                    self.conversation_offsets(split), batch_size, block_size,
                                    seed, self.eot_id, rank, world_size,
                                    name=f"split {split!r} of dataset {self.name}")
        return RandomBatchSampler(self.tokens(split), batch_size, block_size, seed, rank,
                                  world_size, name=f"split {split!r} of dataset {self.name}")
