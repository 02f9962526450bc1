"""llmctl tokenizers as transformers tokenizers (export) and transformers tokenizers as llmctl
ones (import of a foreign folder).

tiktoken BPE ranks become a byte-level BPE `tokenizer.json` (transformers' own converter);
`char` becomes a word-level vocabulary over single characters; `byte` a byte-level BPE with
no merges. Each gets `<|endoftext|>` at llmctl's end-of-text id, so ids agree exactly. A
foreign (`hf`) or trained (`bpe`) tokenizer.json is exported as it is.

A foreign folder's tokenizer imports as `data.hf_tokenizer.HFTokenizer` (its tokenizer.json:
data can be prepared with it); a folder without tokenizer.json (a slow, e.g. SentencePiece,
tokenizer only) falls back to `TransformersTokenizer`, usable by sample / eval only."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import LlmctlError
from ..data.tokenizers import (
    EOT_TEXT,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    dump_ranks,
)
from . import require


def _char_backend(tok: CharTokenizer) -> Any:
    tk = require("tokenizers")
    vocab = {ch: i for i, ch in enumerate(tok.chars)}
    vocab[EOT_TEXT] = tok.eot_id
    backend = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token=EOT_TEXT))
    # one token per character, whitespace and newlines included
    backend.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = tk.decoders.Fuse()
    return backend


def _byte_backend(tok: ByteTokenizer) -> Any:
    tk = require("tokenizers")
    table = tk.pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_char = bytes_to_unicode()
    assert set(to_char.values()) == set(table)
    vocab = {to_char[b]: b for b in range(256)}
    vocab[EOT_TEXT] = tok.eot_id
    backend = tk.Tokenizer(tk.models.BPE(vocab, merges=[]))
    backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = tk.decoders.ByteLevel()
    return backend


def _tiktoken_backend(tok: TiktokenTokenizer) -> Any:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    encoding = tok.encoding
    with tempfile.TemporaryDirectory() as tmp:
        ranks = Path(tmp) / "ranks.tiktoken"
        ranks.write_bytes(tok.rank_bytes or dump_ranks(encoding._mergeable_ranks))
        return TikTokenConverter(vocab_file=str(ranks), pattern=encoding._pat_str,
                                 extra_special_tokens=dict(encoding._special_tokens)).converted()


def hf_tokenizer(tok: Tokenizer) -> Any:
    """A transformers PreTrainedTokenizerFast giving the same ids as `tok`."""
    require("transformers")
    from transformers import PreTrainedTokenizerFast

    if isinstance(tok, CharTokenizer):
        backend = _char_backend(tok)
    elif isinstance(tok, ByteTokenizer):
        backend = _byte_backend(tok)
    elif isinstance(tok, TiktokenTokenizer):
        backend = _tiktoken_backend(tok)
    elif isinstance(tok, (HFTokenizer, BPETokenizer)):
        backend = require("tokenizers").Tokenizer.from_str(tok.data.decode("utf-8"))
    else:
        raise LlmctlError(f"cannot export a {type(tok).__name__} as a transformers tokenizer")
    if isinstance(tok, HFTokenizer):
        eot = tok.spec["eot_token"]
    elif isinstance(tok, TiktokenTokenizer):
        eot = tok.encoding.decode_single_token_bytes(tok.eot_id).decode("utf-8")
    else:
        eot = tok.decode([tok.eot_id])
    if eot not in backend.get_vocab():
        backend.add_special_tokens([eot])
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=eot, eos_token=eot,
                                   pad_token=eot, clean_up_tokenization_spaces=False)
    if fast.convert_tokens_to_ids(eot) != tok.eot_id:
        raise LlmctlError(f"exported tokenizer puts {eot!r} at id "
                          f"{fast.convert_tokens_to_ids(eot)}, llmctl at {tok.eot_id}")
    return fast


class TransformersTokenizer(Tokenizer):
    """A transformers tokenizer behind llmctl's Tokenizer interface, for an imported folder
    that has no tokenizer.json (sample / eval only: no dataset can be prepared with it)."""

    kind = "transformers"

    def __init__(self, path: str | Path) -> None:
        transformers = require("transformers")
        try:
            self.hf = transformers.AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            raise LlmctlError(f"{path} has no tokenizer transformers can load: {err}") from None
        self.spec = {"kind": "transformers", "path": str(Path(path).resolve())}
        self.vocab_size = len(self.hf)
        eot = self.hf.eos_token_id
        if eot is None:
            raise LlmctlError(f"the tokenizer in {path} has no end-of-sequence token")
        self.eot_id = int(eot)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.hf.encode(text, add_special_tokens=False), dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False,
                              clean_up_tokenization_spaces=False)
