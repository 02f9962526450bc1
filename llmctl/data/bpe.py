"""Training the byte-level BPE tokenizer (`tokenizers.BPETokenizer`) on the corpus with
Hugging Face `tokenizers`.

`prepare --tokenizer bpe --bpe_vocab N` trains it on the training split only, streamed
(the trainer keeps word counts, not the text), and stores `tokenizer.json` beside meta.json
(and in every checkpoint, like a tiktoken rank file). Byte-level: every UTF-8 string
round-trips; `<|endoftext|>` is the end-of-text token (id 0) and, in ordinary text, the
string stays text. The same corpus and options give the same merges.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..core.errors import LlmctlError
from .tokenizers import EOT_TEXT, BPETokenizer, require_tokenizers

MIN_BPE_VOCAB = 256 + 1  # the byte alphabet and end-of-text
# 4x the largest published vocabulary (Gemma's 262,144); the trainer sizes its tables by the
# target, so an absurd one aborts the process (out of memory in Rust) instead of failing
MAX_BPE_VOCAB = 2**20


def bpe_vocab_problem(vocab_size: int) -> str | None:
    """Why `--bpe_vocab vocab_size` cannot be trained, or None."""
    if MIN_BPE_VOCAB <= vocab_size <= MAX_BPE_VOCAB:
        return None
    return (f"--bpe_vocab must be from {MIN_BPE_VOCAB} (the 256 bytes and end-of-text) to "
            f"{MAX_BPE_VOCAB:,}, got {vocab_size:,}")


def train_bpe(texts: Iterator[str], vocab_size: int, progress: bool = False) -> BPETokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (end-of-text included) on `texts`."""
    if problem := bpe_vocab_problem(vocab_size):
        raise LlmctlError(problem)
    tokenizers = require_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=progress)
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok.to_str().encode("utf-8"))


