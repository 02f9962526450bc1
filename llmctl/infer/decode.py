"""Autoregressive decoding with the KV cache: greedy or sampled (`sampling`), EOT stop.

Up to block_size tokens, each step feeds one token through the cache. Once the context is
longer than block_size, each step runs the last block_size tokens afresh (positions
0..block_size-1), exactly as a model without a cache that crops its input would: with
absolute positions or a different first token, the cached keys no longer match, so any
cache reuse there would change the result. The exception is ALiBi (no absolute positions,
only distances): there the cache slides, dropping its oldest token each step, so sampling
continues past block_size at decoding speed. That equals attending to the last block_size
tokens per layer, which is not the same as re-running the cropped context (the kept keys were
computed while older tokens were still visible).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from .sampling import check_sampling, mask_padding, sample_next

if TYPE_CHECKING:
    from .fastpath import FastDecoder


@torch.inference_mode()
def stream_tokens(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, *,
                  temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, eot_id: int | None = None,
                  generator: torch.Generator | None = None,
                  vocab_limit: int | None = None, fast: bool = True,
                  decoder: FastDecoder | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token ids, a (B,) tensor per step, for the (B, T) prompt `idx`.

    With eot_id, a row that produced it keeps yielding eot_id and the stream ends once
    every row has (the EOT itself is yielded). `generator` (on the model's device) makes
    sampling reproducible. `vocab_limit` (the tokenizer's size) keeps the padding ids of a
    padded vocabulary (e.g. 50304 > GPT-2's 50257) from ever being sampled. The model runs
    in eval mode; its previous mode is restored. `fast` uses `fastpath.FastDecoder` where
    the model allows it (same tokens; False: the model's own forward every step);
    `decoder`, a `FastDecoder` of this model kept by the caller, saves preparing its weights
    again on every call (a chat's turns, an evaluation's requests).
    """
    from .fastpath import FastDecoder, supports

    check_sampling(temperature, top_k, top_p)
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"idx must be (B, T) with T >= 1, got shape {tuple(idx.shape)}")
    if decoder is not None and decoder.model is not model:
        raise ValueError("the decoder was made for another model")
    if max_new_tokens <= 0:
        return
    block_size = model.config.block_size
    was_training = model.training
    model.eval()
    try:
        B, T0 = idx.shape
        # prompt + generated tokens, written in place: the cropped context once the window
        # is full, without re-concatenating every step
        history = idx.new_empty((B, T0 + max_new_tokens))
        history[:, :T0] = idx
        if fast and supports(model):
            total_tokens = min(T0, block_size) + max_new_tokens
            if decoder is None:
                decoder = FastDecoder(model, total_tokens)
            logits = decoder.prefill(idx[:, -block_size:], total_tokens)  # (B, V)
            cache = decoder.cache
        else:
            decoder = None
            out = model(idx[:, -block_size:], use_cache=True, last_logits_only=True)
            logits, cache = out.logits[:, -1], out.kv_cache
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        chosen = None  # the next tokens where the fast step picked them (no logits)
        for step in range(max_new_tokens):
            if chosen is not None:
                token, chosen = chosen, None
            else:
                token = sample_next(mask_padding(logits, vocab_limit), temperature, top_k,
                                    top_p, generator)
            if eot_id is not None:
                token = token.masked_fill(done, eot_id)
                done |= token == eot_id
            yield token
            if (eot_id is not None and bool(done.all())) or step == max_new_tokens - 1:
                return
            history[:, T0 + step] = token
            if cache is not None and cache.length < block_size:
                if decoder is not None and temperature == 0:
                    chosen = decoder.greedy_step(token, vocab_limit)
                elif decoder is not None:
                    chosen = decoder.sampled_step(token, temperature, top_k, top_p,
                                                  vocab_limit, generator)
                else:
                    out = model(token[:, None], kv_cache=cache, last_logits_only=True)
                    logits = out.logits[:, -1]
            elif cache is not None and model.config.pos_emb == "alibi":  # slide the window
                cache.drop_oldest(cache.length - block_size + 1)
                out = model(token[:, None], kv_cache=cache, last_logits_only=True)
                logits = out.logits[:, -1]
            else:  # window full: recompute on the cropped context, as a cache-less model would
                context = history[:, max(0, T0 + step + 1 - block_size):T0 + step + 1]
                logits = model(context, use_cache=False, last_logits_only=True).logits[:, -1]
                cache = None
    finally:
        model.train(was_training)
        if decoder is not None:  # a kept decoder holds no cache between calls
            decoder.cache = None


def generate(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eot_id: int | None = None, generator: torch.Generator | None = None,
             vocab_limit: int | None = None, fast: bool = True,
             decoder: FastDecoder | None = None) -> torch.Tensor:
    """The prompt followed by up to max_new_tokens sampled tokens: (B, T + n)."""
    tokens = list(stream_tokens(model, idx, max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, eot_id=eot_id, generator=generator,
                                vocab_limit=vocab_limit, fast=fast, decoder=decoder))
    if not tokens:
        return idx
    return torch.cat((idx, torch.stack(tokens, dim=1)), dim=1)
