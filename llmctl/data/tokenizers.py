"""Tokenizers recorded as a JSON spec, so train / eval / sample rebuild exactly the same one.

Kinds (`spec["kind"]`):
- `tiktoken`: a BPE encoding (`gpt2` by default). Its rank file is written beside meta.json
  (`spec["file"]`, relative to the folder holding meta.json, with its `sha256`) together with
  the split pattern and special tokens, so rebuilding never needs the network.
- `char`: the sorted characters of the corpus (`spec["chars"]`), end-of-text = len(chars).
- `byte`: the 256 byte values, end-of-text = 256.
- `bpe`: a byte-level BPE trained on the corpus (`data/bpe.py`); its `tokenizer.json` is
  stored beside meta.json (`spec["file"]`, with its `sha256`).
- `hf`: a foreign transformers tokenizer.json (`hf_tokenizer.py`), stored the same way.

The interface is `tokenizer_base.py`, tiktoken's encodings `tiktoken_encodings.py`; this
module builds any kind from its spec, and re-exports both for their callers.

`gpt2` is built from GPT-2's ranks embedded in the package (`embedded.py`), so it never needs
the network. `LLMCTL_TIKTOKEN_FILE` names a local `.tiktoken` rank file used wherever another
tiktoken encoding would otherwise be downloaded (same as `prepare --tokenizer_file`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import LlmctlError, one_of
from .hf_tokenizer import KIND as HF_KIND
from .hf_tokenizer import (
    HFTokenizer,
    hf_from_spec,
    hf_tokenizer_from_path,
    is_hf_tokenizer,
)
from .tiktoken_encodings import (
    KNOWN_ENCODINGS,
    RANK_FILE,
    TIKTOKEN_FILE_ENV,
    TiktokenTokenizer,
    dump_ranks,
    from_rank_file,
    from_tiktoken_name,
    parse_ranks,
    tiktoken_from_spec,
)
from .tokenizer_base import (
    EOT_TEXT,
    KINDS,
    REPLACEMENT,
    Tokenizer,
    describe_spec,
    read_spec_file,
    spec_problems,
)

__all__ = ["BPE_FILE", "EOT_TEXT", "KINDS", "KNOWN_ENCODINGS", "RANK_FILE", "TIKTOKEN_FILE_ENV",
           "BPETokenizer", "ByteTokenizer", "CharTokenizer", "ExtendedTokenizer", "HFTokenizer",
           "TiktokenTokenizer", "Tokenizer", "create_tokenizer", "describe_spec", "dump_ranks",
           "parse_ranks", "same_tokenizer", "tokenizer_extension", "tokenizer_files",
           "tokenizer_from_spec"]

BPE_FILE = "tokenizer.json"  # the trained BPE's file beside meta.json


class ByteTokenizer(Tokenizer):
    kind = "byte"

    def __init__(self) -> None:
        self.spec = {"kind": "byte"}
        self.vocab_size, self.eot_id = 257, 256

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(_utf8(text), dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            out += bytes((i,)) if 0 <= i < 256 else (
                EOT_TEXT.encode() if i == 256 else REPLACEMENT.encode())
        return out.decode("utf-8", errors="replace")


class CharTokenizer(Tokenizer):
    """Character-level vocabulary (as nanoGPT's shakespeare_char), plus end-of-text."""

    kind = "char"

    def __init__(self, chars: str) -> None:
        if not chars or len(set(chars)) != len(chars) or list(chars) != sorted(chars):
            raise LlmctlError("a char tokenizer needs a non-empty string of distinct, sorted "
                              "characters")
        self.chars = chars
        self.spec = {"kind": "char", "chars": chars}
        self.vocab_size, self.eot_id = len(chars) + 1, len(chars)
        self._codes = np.frombuffer(chars.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)

    @classmethod
    def fit(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        if not seen:
            raise LlmctlError("the source has no text to build a character vocabulary from")
        return cls("".join(sorted(seen)))

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, codes)
        ids_clipped = np.minimum(ids, len(self._codes) - 1)
        unknown = self._codes[ids_clipped] != codes
        if unknown.any():
            missing = sorted({chr(c) for c in codes[unknown][:1000]})
            raise LlmctlError(f"text has characters outside the char vocabulary: "
                              f"{''.join(missing)[:40]!r}")
        return ids.astype(np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        n = len(self.chars)
        return "".join(self.chars[i] if 0 <= i < n else EOT_TEXT if i == n else REPLACEMENT
                       for i in map(int, ids))


class ExtendedTokenizer(Tokenizer):
    """A base tokenizer plus special tokens appended after its vocabulary (chat roles).

    Ordinary text never produces them (their strings stay text); `token_id` gives their ids.
    """

    def __init__(self, base: Tokenizer, added: Iterable[str]) -> None:
        added = list(added)
        if not added or len(set(added)) != len(added) or not all(
                isinstance(t, str) and t for t in added):
            raise LlmctlError("added_tokens must be a non-empty list of distinct strings")
        self.base, self.added = base, added
        self.kind = base.kind
        self.spec = {**base.spec, "added_tokens": added}
        self.vocab_size = base.vocab_size + len(added)
        self.eot_id = base.eot_id
        self.added_ids = {t: base.vocab_size + i for i, t in enumerate(added)}

    def token_id(self, token: str) -> int:
        if token not in self.added_ids:
            raise LlmctlError(f"the tokenizer has no special token {token!r} (it has "
                              f"{', '.join(self.added)})")
        return self.added_ids[token]

    def encode_array(self, text: str) -> np.ndarray:
        return self.base.encode_array(text)

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        first = self.base.vocab_size
        out, run = [], []
        for i in map(int, ids):
            if first <= i < self.vocab_size:
                out.append(self.base.decode(run))
                out.append(self.added[i - first])
                run = []
            else:
                run.append(i)
        out.append(self.base.decode(run))
        return "".join(out)

    def save_files(self, folder: Path) -> None:
        self.base.save_files(folder)


def tokenizer_extension(base: dict[str, Any], new: dict[str, Any]) -> list[str] | None:
    """The special tokens `new` appends to `base` ([] when equal); None when `new` is not
    `base` (or `base` followed by more added tokens)."""
    strip = ("added_tokens",)
    core_a = {k: v for k, v in base.items() if k not in strip}
    core_b = {k: v for k, v in new.items() if k not in strip}
    if not same_tokenizer(core_a, core_b):
        return None
    old, more = list(base.get("added_tokens") or []), list(new.get("added_tokens") or [])
    if more[:len(old)] != old:
        return None
    return more[len(old):]


def require_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise LlmctlError("--tokenizer bpe needs the Hugging Face `tokenizers` package: "
                          "pip install tokenizers") from None
    return tokenizers


class BPETokenizer(Tokenizer):
    kind = "bpe"

    def __init__(self, data: bytes) -> None:
        tokenizers = require_tokenizers()
        try:
            self.tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:  # the library raises plain Exceptions on bad JSON
            raise LlmctlError(f"{BPE_FILE} is not a valid tokenizers file: {err}") from None
        self.tok.encode_special_tokens = True  # "<|endoftext|>" in text is just text
        self.data = data
        self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
        eot = self.tok.token_to_id(EOT_TEXT)
        if eot is None:
            raise LlmctlError(f"{BPE_FILE} has no end-of-text token {EOT_TEXT!r}")
        self.eot_id = int(eot)
        self.spec = {"kind": "bpe", "file": BPE_FILE, "vocab_size": self.vocab_size,
                     "sha256": hashlib.sha256(data).hexdigest()}

    def encode_array(self, text: str) -> np.ndarray:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        pieces: list[bytes] = []
        for i in map(int, ids):
            token = self.tok.id_to_token(i) if 0 <= i < self.vocab_size else None
            if token is None:
                pieces.append("\ufffd".encode())
            elif i == self.eot_id:
                pieces.append(EOT_TEXT.encode())
            else:
                pieces.append(_token_bytes(token))
        return b"".join(pieces).decode("utf-8", errors="replace")

    def save_files(self, folder: Path) -> None:
        from ..core.files import write_bytes_atomic

        write_bytes_atomic(Path(folder) / BPE_FILE, self.data)


_BYTE_OF_CHAR: dict[str, int] | None = None


def _token_bytes(token: str) -> bytes:
    """A byte-level token's bytes (GPT-2's printable-character mapping, inverted)."""
    global _BYTE_OF_CHAR
    if _BYTE_OF_CHAR is None:
        keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                *range(ord("®"), ord("ÿ") + 1)]
        chars, extra = list(keep), 0
        for b in range(256):
            if b not in keep:
                keep.append(b)
                chars.append(256 + extra)
                extra += 1
        _BYTE_OF_CHAR = {chr(c): b for b, c in zip(keep, chars, strict=True)}
    return bytes(_BYTE_OF_CHAR[ch] for ch in token)


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, repaired as tiktoken does
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode()


def create_tokenizer(name: str | None = None, file: str | Path | None = None) -> Tokenizer:
    """The tokenizer `prepare` records: `char` is built later from the corpus (CharTokenizer.fit).

    name: a tiktoken encoding (default gpt2), 'byte', 'char' or 'hf:PATH' (a transformers
    folder's tokenizer.json, or such a file); file: a local .tiktoken rank file (else
    $LLMCTL_TIKTOKEN_FILE for tiktoken encodings).
    """
    if is_hf_tokenizer(name):
        if file:
            raise LlmctlError("--tokenizer_file is for tiktoken rank files, not --tokenizer "
                              "hf:PATH")
        return hf_tokenizer_from_path(name)
    if name in ("char", "byte"):
        if file:
            raise LlmctlError(f"--tokenizer_file is for tiktoken rank files, not --tokenizer "
                              f"{name}")
        if name == "byte":
            return ByteTokenizer()
        raise LlmctlError("a char tokenizer is fitted on the corpus: use CharTokenizer.fit")
    file = file or os.environ.get(TIKTOKEN_FILE_ENV) or None
    if file:
        return from_rank_file(Path(file), name)
    return from_tiktoken_name(name or "gpt2")


# ---------------------------------------------------------------------------- specs


def tokenizer_files(spec: dict[str, Any]) -> list[str]:
    """File names (relative to the folder holding the spec) the tokenizer needs."""
    return ([spec["file"]] if spec.get("kind") in ("tiktoken", "bpe", HF_KIND)
            and spec.get("file") else [])


def tokenizer_from_spec(spec: dict[str, Any], folder: str | Path | None = None) -> Tokenizer:
    """Rebuild the tokenizer a meta.json / checkpoint config records; files are under `folder`."""
    problems = spec_problems(spec)
    if problems:  # checked as data first: a wrong type is a message, not a crash inside
        where = f" recorded in {folder}" if folder is not None else ""
        raise LlmctlError(f"the tokenizer{where} is not valid: {'; '.join(problems)}")
    if spec.get("added_tokens"):
        base = {k: v for k, v in spec.items() if k != "added_tokens"}
        return ExtendedTokenizer(tokenizer_from_spec(base, folder), spec["added_tokens"])
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        chars = spec.get("chars")
        if not isinstance(chars, str):
            raise LlmctlError("char tokenizer spec has no 'chars' string")
        return CharTokenizer(chars)
    if kind == "bpe":
        return _bpe_from_spec(spec, Path(folder) if folder is not None else None)
    if kind == HF_KIND:
        return hf_from_spec(spec, Path(folder) if folder is not None else None)
    if kind != "tiktoken":
        raise LlmctlError(f"tokenizer spec kind: {one_of(kind, KINDS)}")
    return tiktoken_from_spec(spec, Path(folder) if folder is not None else None)


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two tokenizer specs give the same token ids (file locations do not matter)."""
    if list(a.get("added_tokens") or []) != list(b.get("added_tokens") or []):
        return False
    if a.get("kind") != b.get("kind"):
        return False
    if a.get("kind") == "char":
        return a.get("chars") == b.get("chars")
    if a.get("kind") == "bpe":
        return a.get("sha256") == b.get("sha256")
    if a.get("kind") == HF_KIND:  # the same tokenizer.json, the same end of text
        return bool(a.get("sha256")) and all(a.get(k) == b.get(k)
                                             for k in ("sha256", "eot_token"))
    if a.get("kind") == "tiktoken":
        if a.get("sha256") and b.get("sha256"):
            keys = ("sha256", "pat_str", "special_tokens")
            return all(a.get(k) == b.get(k) for k in keys)
        return a.get("name") == b.get("name")
    return True  # byte


def _bpe_from_spec(spec: dict[str, Any], folder: Path | None) -> BPETokenizer:
    return BPETokenizer(read_spec_file(spec, folder, "bpe")[1])
