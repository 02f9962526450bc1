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


def train_bpe(texts: Iterator[str], vocab_size: int, progress: bool = False) -> BPETokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (end-of-text included) on `texts`."""
    if vocab_size < MIN_BPE_VOCAB:
        raise LlmctlError(f"--bpe_vocab must be at least {MIN_BPE_VOCAB} (the 256 bytes and "
                          f"end-of-text), got {vocab_size}")
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


