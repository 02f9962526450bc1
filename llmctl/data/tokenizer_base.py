"""What every llmctl tokenizer is: text <-> ids behind one interface, described by a JSON spec
(`spec["kind"]`: tiktoken, char, byte, bpe, hf; see `tokenizers.py` for the kinds)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

EOT_TEXT = "<|endoftext|>"
REPLACEMENT = "\ufffd"  # what an id the vocabulary lacks decodes to


class Tokenizer:
    """Text <-> token ids. `encode` is ordinary text (special-token strings stay text)."""

    kind: str
    spec: dict[str, Any]
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of `text` as a 1-D integer array (no end-of-text appended)."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def save_files(self, folder: Path) -> None:
        """Write the files `tokenizer_files(self.spec)` names into `folder`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({describe_spec(self.spec)}, vocab_size={self.vocab_size})"


def describe_spec(spec: dict[str, Any]) -> str:
    if spec.get("added_tokens"):
        base = describe_spec({k: v for k, v in spec.items() if k != "added_tokens"})
        return f"{base} + {len(spec['added_tokens'])} special tokens"
    kind = spec.get("kind")
    if kind == "tiktoken":
        return f"tiktoken:{spec.get('name')}"
    if kind == "char":
        return f"char({len(spec.get('chars', ''))} chars)"
    if kind == "bpe":
        return f"bpe({spec.get('vocab_size')} trained)"
    if kind == "hf":
        return f"hf({spec.get('vocab_size')} tokens, sha256 {str(spec.get('sha256'))[:12]})"
    return str(kind)
