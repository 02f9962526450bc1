"""The key/value cache used for prefill and decoding.

Each layer owns a `LayerCache`: a few tensors preallocated to `capacity` (the model's
block_size) along dim -2, the time axis, so that a decoding step writes one row instead of
re-concatenating the whole history. What a layer stores is up to its attention kind:
mha/mqa/gqa keep K and V per KV head, MLA keeps one latent (+ the shared RoPE key) per token.
"""

from __future__ import annotations

import torch


class LayerCache:
    """One layer's cached tensors; dim -2 of every tensor is time."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.buffers: list[torch.Tensor] = []

    def append(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write `new` after the cached tokens; return views over everything cached so far."""
        steps = new[0].shape[-2]
        end = self.length + steps
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {self.length} cached + {steps} new tokens > "
                             f"capacity {self.capacity} (crop the context to block_size)")
        if not self.buffers:
            self.buffers = [x.new_empty((*x.shape[:-2], self.capacity, x.shape[-1]))
                            for x in new]
        for buffer, x in zip(self.buffers, new, strict=True):
            buffer[..., self.length:end, :] = x
        self.length = end
        return tuple(buffer[..., :end, :] for buffer in self.buffers)

    @property
    def numbers_per_token(self) -> int:
        """Cached numbers per token per sequence (e.g. 2 * kv_heads * head_dim for gqa)."""
        total = 0
        for buffer in self.buffers:
            total += buffer.numel() // (buffer.shape[0] * self.capacity)
        return total

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)


class KVCache:
    """Per-layer caches plus the number of tokens already processed (the next position)."""

    def __init__(self, n_layer: int, capacity: int):
        self.capacity = capacity
        self.layers = [LayerCache(capacity) for _ in range(n_layer)]

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)
