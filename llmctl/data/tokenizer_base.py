"""What every llmctl tokenizer is: text <-> ids behind one interface, described by a JSON spec
(`spec["kind"]`: tiktoken, char, byte, bpe, hf; see `tokenizers.py` for the kinds)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import LlmctlError
from ..core.files import read_user_file

MAX_TOKENIZER_BYTES = 256 * 2**20  # Llama 3's tokenizer.json is 9 MB, the largest published ~35 MB

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


def read_spec_file(spec: dict[str, Any], folder: Path | None, kind: str) -> tuple[Path, bytes]:
    """The file a recorded tokenizer spec names (`spec["file"]`, relative to `folder`), read
    with a bound and checked against the spec's sha256 when it records one."""
    rel = spec.get("file")
    if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise LlmctlError(f"{kind} tokenizer spec file {rel!r} must be a relative file name")
    if folder is None or not (folder / rel).exists():  # other kinds: read_user_file says
        raise LlmctlError(f"{kind} tokenizer file {rel} is missing"
                          + (f" in {folder}" if folder is not None else " (no folder given)"))
    path = folder / rel
    data = read_user_file(path, f"{kind} tokenizer file", MAX_TOKENIZER_BYTES, text=False)
    if spec.get("sha256") and hashlib.sha256(data).hexdigest() != spec["sha256"]:
        raise LlmctlError(f"{path} does not match the sha256 its spec records (the "
                          "tokenizer file was changed or corrupted)")
    return path, data
