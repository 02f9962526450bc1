"""The key/value cache used for prefill and decoding.

Each layer owns a `LayerCache`: a few tensors along dim -2, the time axis, that grow by
doubling up to `capacity` (the model's block_size), so that a decoding step writes one row
instead of re-concatenating the whole history, and a short prompt does not allocate a
block_size cache. What a layer stores is up to its attention kind:
mha/mqa/gqa keep K and V per KV head, MLA keeps one latent (+ the shared RoPE key) per token.
"""

from __future__ import annotations

import torch

_MIN_ROWS = 64  # the first allocation holds at least this many tokens


class LayerCache:
    """One layer's cached tensors; dim -2 of every tensor is time."""

    def __init__(self, capacity: int, reserve: int = 0):
        self.capacity = capacity
        self.reserve = reserve  # the first allocation holds at least this many tokens
        self.length = 0
        self.buffers: list[torch.Tensor] = []

    def append(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write `new` after the cached tokens; return views over everything cached so far."""
        steps = new[0].shape[-2]
        end = self.length + steps
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {self.length} cached + {steps} new tokens > "
                             f"capacity {self.capacity} (crop the context to block_size)")
        if not self.buffers or end > self.allocated:
            self._grow(new, end)
        for buffer, x in zip(self.buffers, new, strict=True):
            buffer[..., self.length:end, :] = x
        self.length = end
        return tuple(buffer[..., :end, :] for buffer in self.buffers)

    def truncate(self, length: int) -> None:
        """Forget every token after the first `length` (speculative decoding's rollback)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length

    def drop_oldest(self, n: int) -> None:
        """Forget the first n tokens, keeping the rest in order (a sliding window: only valid
        where cached entries carry no absolute position, as with ALiBi)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot drop {n} of {self.length} cached tokens")
        if n:
            for buffer in self.buffers:
                buffer[..., : self.length - n, :] = buffer[..., n:self.length, :].clone()
            self.length -= n

    @property
    def allocated(self) -> int:
        """Tokens the buffers have room for now (0 before the first append)."""
        return self.buffers[0].shape[-2] if self.buffers else 0

    def _grow(self, new: tuple[torch.Tensor, ...], end: int) -> None:
        size = min(self.capacity, max(end, 2 * self.allocated, _MIN_ROWS, self.reserve))
        grown = [x.new_empty((*x.shape[:-2], size, x.shape[-1])) for x in new]
        for old, buffer in zip(self.buffers, grown, strict=False):
            buffer[..., :self.length, :] = old[..., :self.length, :]
        self.buffers = grown

    @property
    def numbers_per_token(self) -> int:
        """Cached numbers per token per sequence (e.g. 2 * kv_heads * head_dim for gqa)."""
        return sum(b.numel() // (b.shape[0] * b.shape[-2]) for b in self.buffers)

    @property
    def nbytes(self) -> int:
        """Bytes allocated now."""
        return sum(b.numel() * b.element_size() for b in self.buffers)

    @property
    def capacity_nbytes(self) -> int:
        """Bytes once the cache holds `capacity` tokens."""
        return sum(b.numel() // b.shape[-2] * self.capacity * b.element_size()
                   for b in self.buffers)


class KVCache:
    """Per-layer caches plus the number of tokens already processed (the next position).

    `reserve`: tokens to allocate room for at once (a decoder that knows how many tokens it
    will generate then never grows the buffers)."""

    def __init__(self, n_layer: int, capacity: int, reserve: int = 0):
        self.capacity = capacity
        self.layers = [LayerCache(capacity, reserve) for _ in range(n_layer)]

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def truncate(self, length: int) -> None:
        for layer in self.layers:
            layer.truncate(length)

    def drop_oldest(self, n: int) -> None:
        for layer in self.layers:
            layer.drop_oldest(n)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def capacity_nbytes(self) -> int:
        return sum(layer.capacity_nbytes for layer in self.layers)
