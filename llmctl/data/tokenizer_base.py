"""What every llmctl tokenizer is: text <-> ids behind one interface, described by a JSON spec
(`spec["kind"]`: tiktoken, char, byte, bpe, hf; see `tokenizers.py` for the kinds)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..core.bounds import SHA256_HEX
from ..core.errors import LlmctlError, one_of, preview
from ..core.files import read_user_file

MAX_TOKENIZER_BYTES = 256 * 2**20  # Llama 3's tokenizer.json is 9 MB, the largest published ~35 MB

KINDS = ("tiktoken", "char", "byte", "bpe", "hf")
MAX_TOKEN_ID = 2**32 - 1  # ids are stored as uint32 at most

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


def spec_problems(spec: Any, where: str = "tokenizer") -> list[str]:
    """Every problem with a recorded tokenizer spec as data (types, ranges, file names),
    each naming its field under `where`; [] when it can be rebuilt from."""
    if not isinstance(spec, dict):
        return [f"{where} must be a JSON object, got {preview(spec)}"]
    problems = []
    kind = spec.get("kind")
    if kind not in KINDS:
        problems.append(f"{where}.kind: {one_of(kind, KINDS)}")
    added = spec.get("added_tokens")
    if added is not None and not (isinstance(added, list) and all(
            isinstance(t, str) and t for t in added) and len(set(added)) == len(added)):
        problems.append(f"{where}.added_tokens must be a list of distinct non-empty strings, "
                        f"got {preview(added)}")
    for key in ("name", "pat_str", "eot_token"):
        if key in spec and not isinstance(spec[key], str):
            problems.append(f"{where}.{key} must be a string, got {preview(spec[key])}")
    if kind == "char" and not (isinstance(spec.get("chars"), str) and spec["chars"]):
        problems.append(f"{where}.chars must be a non-empty string, got "
                        f"{preview(spec.get('chars'))}")
    rel = spec.get("file")
    if rel is not None and not (isinstance(rel, str) and rel and not Path(rel).is_absolute()
                                and ".." not in Path(rel).parts):
        problems.append(f"{where}.file must be a file name relative to its folder, got "
                        f"{preview(rel)}")
    sha = spec.get("sha256")
    if sha is not None and not (isinstance(sha, str) and SHA256_HEX.fullmatch(sha)):
        problems.append(f"{where}.sha256 must be 64 lowercase hex digits, got {preview(sha)}")
    special = spec.get("special_tokens")
    if "special_tokens" in spec and not (isinstance(special, dict) and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_TOKEN_ID
            for v in special.values())):
        problems.append(f"{where}.special_tokens must map token strings to ids in "
                        f"[0, {MAX_TOKEN_ID}], got {preview(special)}")
    return problems
