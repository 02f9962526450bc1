"""Which text trains `prepare --tokenizer bpe`: the training split only, never validation text.

- sources with their own splits: the train streams;
- a seeded held-out fraction of documents: the same per-document draws the tokenization
  pass makes, so exactly the documents routed to train;
- local text cut at a tail fraction: the leading pieces holding (1 - val_fraction) of the
  characters; the train/val cut is then made after exactly their tokens (`train_tokens`), so
  the validation split starts where the tokenizer's training text ended.

It also measures compression (UTF-8 bytes per token) of the trained BPE and of GPT-2 on up to
`_SAMPLE_CHARS` of validation text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.errors import LlmctlError
from .bpe import BPETokenizer, train_bpe
from .pipeline import batch_pieces, encode_item
from .sources.base import SourcePlan

_SAMPLE_CHARS = 1_000_000


@dataclass
class TrainedBPE:
    tokenizer: BPETokenizer
    train_tokens: int | None  # tail policy: tokens of the training text (the split point)
    compression: dict[str, Any] = field(default_factory=dict)


def train_on_split(plan: SourcePlan, opts: Any) -> TrainedBPE:
    """Train the BPE of `opts.bpe_vocab` on the training text of `plan`."""
    held_out: list[str] = []
    fraction = opts.effective_val_fraction
    if plan.split_policy == "tail":
        total = sum(len(text) for text, _, _ in _pieces(plan))
        cut = _tail_cut(plan, max(1, int(total * (1 - fraction))))
        texts = _leading(plan, cut)
    elif plan.split_policy == "heldout":
        texts = _routed(plan, np.random.default_rng(opts.seed), fraction, held_out)
    else:
        texts = _own_train(plan, held_out)
    tokenizer = train_bpe(texts, opts.bpe_vocab, progress=opts.progress)
    train_tokens = None
    if plan.split_policy == "tail":
        train_tokens = _count_tokens(plan, tokenizer, cut)
        held_out = _sample_after(plan, cut)
    return TrainedBPE(tokenizer, train_tokens, _compression(tokenizer, "".join(held_out)))


def _pieces(plan: SourcePlan) -> Iterator[tuple[str, bool, int]]:
    for stream in plan.streams:
        yield from stream.pieces()


def _tail_cut(plan: SourcePlan, budget: int) -> tuple[int, int]:
    """(piece index, character offset) where the training text ends: about `budget`
    characters in, just before a space that follows a non-space (a pre-token boundary of the
    byte-level BPE, so the tokens before it are a prefix of the piece's tokens)."""
    seen = 0
    for i, (text, _, _) in enumerate(_pieces(plan)):
        if seen + len(text) > budget:
            at = budget - seen
            while at > 0 and not (text[at] == " " and not text[at - 1].isspace()):
                at -= 1
            return i, at
        seen += len(text)
    return i + 1, 0  # the budget covers everything (cannot happen with val_fraction > 0)


def _leading(plan: SourcePlan, cut: tuple[int, int]) -> Iterator[str]:
    piece, at = cut
    for i, (text, _, _) in enumerate(_pieces(plan)):
        if i > piece or (i == piece and at == 0):
            return
        yield text[:at] if i == piece else text


def _sample_after(plan: SourcePlan, cut: tuple[int, int]) -> list[str]:
    piece, at = cut
    out, size = [], 0
    for i, (text, _, _) in enumerate(_pieces(plan)):
        if i >= piece and size < _SAMPLE_CHARS:
            out.append(text[at:] if i == piece else text)
            size += len(out[-1])
    return out


def _routed(plan: SourcePlan, rng: np.random.Generator, fraction: float,
            held_out: list[str]) -> Iterator[str]:
    """Documents routed to train by the tokenization pass's own draws (one per document)."""
    size = 0
    for stream in plan.streams:
        split = None
        for text, ends, _ in stream.pieces():
            if split is None:
                split = "val" if rng.random() < fraction else "train"
            if split == "train":
                yield text
            elif size < _SAMPLE_CHARS:
                held_out.append(text)
                size += len(text)
            if ends:
                split = None


def _own_train(plan: SourcePlan, held_out: list[str]) -> Iterator[str]:
    size = 0
    for stream in plan.streams:
        for text, _, _ in stream.pieces():
            if stream.split == "train":
                yield text
            elif stream.split == "val" and size < _SAMPLE_CHARS:
                held_out.append(text)
                size += len(text)


def _count_tokens(plan: SourcePlan, tokenizer: BPETokenizer, cut: tuple[int, int]) -> int:
    """Tokens the tokenization pass writes before the cut (EOTs included): whole pieces, then
    the cut piece's tokens that cover its training prefix (after the whole piece if the
    prefix's tokens are not a prefix of the piece's, so no validation text is ever cut in)."""
    piece, at = cut

    def leading() -> Iterator[tuple[str, bool, int]]:
        for i, item in enumerate(_pieces(plan)):
            if i >= piece:
                return
            yield item

    count = sum(len(encode_item(tokenizer, item.texts, item.eots, "uint32"))
                for item in batch_pieces(leading(), lambda: "all"))
    if at:
        text = next(t for i, (t, _, _) in enumerate(_pieces(plan)) if i == piece)
        whole, prefix = tokenizer.encode_array(text), tokenizer.encode_array(text[:at])
        same = len(prefix) <= len(whole) and np.array_equal(whole[: len(prefix)], prefix)
        count += len(prefix) if same else len(whole)
    return count


def _compression(tokenizer: BPETokenizer, text: str) -> dict[str, Any]:
    """UTF-8 bytes per token of the trained BPE and of GPT-2 (None when unavailable)."""
    if not text:
        return {}
    n_bytes = len(text.encode("utf-8", "surrogatepass"))
    out: dict[str, Any] = {"text": "validation", "bytes": n_bytes,
                           "bpe": n_bytes / max(1, len(tokenizer.encode_array(text)))}
    try:
        from .tokenizers import create_tokenizer

        gpt2 = create_tokenizer("gpt2")
        out["gpt2"] = n_bytes / max(1, len(gpt2.encode_array(text)))
    except LlmctlError:  # no network and no local rank file: report the BPE alone
        out["gpt2"] = None
    return out
