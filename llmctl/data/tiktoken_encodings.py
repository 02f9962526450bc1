"""tiktoken BPE encodings (kind `tiktoken`): GPT-2's ranks embedded in the package, other
registered encodings (downloaded by tiktoken), or a local `.tiktoken` rank file; the spec
records the rank file (copied beside meta.json, with its sha256), split pattern and special
tokens, so rebuilding never needs the network."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import LlmctlError, one_of
from ..core.files import read_user_file
from .tokenizer_base import EOT_TEXT, MAX_TOKENIZER_BYTES, REPLACEMENT, Tokenizer

TIKTOKEN_FILE_ENV = "LLMCTL_TIKTOKEN_FILE"
RANK_FILE = "tokenizer.tiktoken"  # name of the copied rank file beside meta.json
# Split patterns / special tokens of tiktoken's public encodings, so a local rank file
# rebuilds them offline. Identified by the sha256 of their .tiktoken rank file.
_CL100K_PAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
               r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
_O200K_PAT = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""", r"""\s+""",
])
_R50K_SHA = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
KNOWN_ENCODINGS: dict[str, dict[str, Any]] = {
    "gpt2": {"sha256": _R50K_SHA, "pat": "r50k", "special": {EOT_TEXT: 50256}},
    "r50k_base": {"sha256": _R50K_SHA, "pat": "r50k", "special": {EOT_TEXT: 50256}},
    "p50k_base": {"sha256": "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069",
                  "pat": "r50k", "special": {EOT_TEXT: 50256}},
    "cl100k_base": {
        "sha256": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        "pat": _CL100K_PAT, "special": {EOT_TEXT: 100257, "<|fim_prefix|>": 100258,
                                        "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
                                        "<|endofprompt|>": 100276}},
    "o200k_base": {"sha256": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
                   "pat": _O200K_PAT, "special": {EOT_TEXT: 199999, "<|endofprompt|>": 200018}},
}


def _pattern(key: str) -> str:
    if key == "r50k":
        from tiktoken_ext.openai_public import r50k_pat_str

        return r50k_pat_str
    return key


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE encoding; `rank_bytes` is its .tiktoken file when it has one."""

    kind = "tiktoken"

    def __init__(self, encoding: Any, spec: dict[str, Any], rank_bytes: bytes | None) -> None:
        self.encoding = encoding
        self.spec = spec
        self.rank_bytes = rank_bytes
        self.vocab_size = int(encoding.n_vocab)
        eot_token = spec.get("eot_token", EOT_TEXT)
        if eot_token not in encoding.special_tokens_set:
            raise LlmctlError(f"tiktoken encoding {spec.get('name')!r} has no end-of-text token "
                              f"{eot_token!r}")
        self.eot_id = int(encoding.encode_single_token(eot_token))
        # Faster than encode_ordinary (no Python list) and identical with no special tokens.
        self._to_numpy = getattr(encoding, "encode_to_numpy", None)

    def encode_array(self, text: str) -> np.ndarray:
        if self._to_numpy is None:
            return np.asarray(self.encoding.encode_ordinary(text), dtype=np.uint32)
        try:
            return self._to_numpy(text, allowed_special=set(), disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates: the same repair encode_ordinary makes
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self._to_numpy(text, allowed_special=set(), disallowed_special=())

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        try:
            return self.encoding.decode(ids)
        except (KeyError, ValueError, OverflowError):  # ids the vocabulary lacks
            parts = []
            for i in ids:
                try:
                    parts.append(self.encoding.decode_single_token_bytes(i))
                except (KeyError, ValueError, OverflowError):
                    parts.append(REPLACEMENT.encode())
            return b"".join(parts).decode("utf-8", errors="replace")

    def save_files(self, folder: Path) -> None:
        if self.rank_bytes is not None and "file" in self.spec:
            from ..core.files import write_bytes_atomic

            write_bytes_atomic(folder / self.spec["file"], self.rank_bytes)


# ---------------------------------------------------------------------------- rank files


def parse_ranks(data: bytes, origin: str) -> dict[bytes, int]:
    """A .tiktoken rank file: one `base64(token) rank` per line."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[binascii.a2b_base64(token)] = int(rank)
        except (ValueError, binascii.Error):
            raise LlmctlError(f"{origin} is not a .tiktoken rank file (line {lineno}: "
                              f"{line[:60]!r}); expected 'base64-token rank' lines") from None
    if not ranks:
        raise LlmctlError(f"{origin} is an empty rank file")
    if len(set(ranks.values())) != len(ranks):
        raise LlmctlError(f"{origin} gives the same rank to several tokens")
    return ranks


def dump_ranks(ranks: dict[bytes, int]) -> bytes:
    return b"".join(base64.b64encode(token) + b" " + str(rank).encode() + b"\n"
                    for token, rank in sorted(ranks.items(), key=lambda item: item[1]))


def _read_rank_file(path: Path) -> bytes:
    # bounded, regular files only: /dev/zero or a FIFO named as the rank file must not hang
    return read_user_file(path, "tokenizer file", MAX_TOKENIZER_BYTES, text=False)


def _encoding(name: str, pat_str: str, ranks: dict[bytes, int],
              special: dict[str, int]) -> Any:
    import tiktoken

    clash = sorted(t for t, i in special.items() if i in set(ranks.values()))
    if clash:
        raise LlmctlError(f"special tokens {clash} reuse ids of ordinary tokens in the rank file")
    try:
        return tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks,
                                 special_tokens=special)
    except Exception as err:  # the Rust core raises its own exception types (bad regex...)
        raise LlmctlError(f"cannot build tiktoken encoding {name!r}: {err}") from None


def _spec_from_ranks(name: str, pattern_from: str, ranks: dict[bytes, int], data: bytes,
                     own: bool) -> dict[str, Any]:
    """The spec of encoding `name` made of these ranks, with `pattern_from`'s split pattern.

    own: the ranks are `pattern_from`'s own, so its special tokens apply; otherwise the only
    special token is end-of-text, right after the last rank.
    """
    known = KNOWN_ENCODINGS[pattern_from]
    special = dict(known["special"]) if own else {EOT_TEXT: max(ranks.values()) + 1}
    return {"kind": "tiktoken", "name": name, "pat_str": _pattern(known["pat"]),
            "special_tokens": special, "eot_token": EOT_TEXT, "file": RANK_FILE,
            "sha256": hashlib.sha256(data).hexdigest()}


def from_rank_file(path: Path, requested: str | None) -> TiktokenTokenizer:
    data = _read_rank_file(path)
    sha = hashlib.sha256(data).hexdigest()
    ranks = parse_ranks(data, str(path))
    matches = [n for n, info in KNOWN_ENCODINGS.items() if info["sha256"] == sha]
    if matches:  # a known encoding's own ranks: take its pattern and special tokens
        if requested and requested in KNOWN_ENCODINGS and requested not in matches:
            raise LlmctlError(f"tokenizer file {path} holds the ranks of {matches[0]}, not of "
                              f"{requested}; drop --tokenizer or name {matches[0]}")
        name = requested if requested in matches else matches[0]
        spec = _spec_from_ranks(name, name, ranks, data, own=True)
    else:
        pattern_from = requested or "gpt2"
        if pattern_from not in KNOWN_ENCODINGS:
            raise LlmctlError(f"--tokenizer {requested!r} with a rank file must name the encoding "
                              f"whose split pattern to use: {', '.join(KNOWN_ENCODINGS)}")
        spec = _spec_from_ranks(Path(path).stem, pattern_from, ranks, data, own=False)
    encoding = _encoding(spec["name"], spec["pat_str"], ranks, spec["special_tokens"])
    return TiktokenTokenizer(encoding, spec, data)


def _embedded_gpt2() -> TiktokenTokenizer:
    """GPT-2's encoding from the ranks inside the package: tiktoken's own `gpt2` split
    pattern and end-of-text token (read from tiktoken_ext.openai_public), no download."""
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    from .embedded import gpt2_rank_bytes

    data = gpt2_rank_bytes()
    ranks = parse_ranks(data, "llmctl's embedded gpt2.tiktoken")
    special = {ENDOFTEXT: max(ranks.values()) + 1}  # 50256, as tiktoken's gpt2
    spec = {"kind": "tiktoken", "name": "gpt2", "pat_str": r50k_pat_str,
            "special_tokens": special, "eot_token": ENDOFTEXT, "file": RANK_FILE,
            "sha256": hashlib.sha256(data).hexdigest()}
    return TiktokenTokenizer(_encoding("gpt2", r50k_pat_str, ranks, special), spec, data)


def _download_error(name: str, err: BaseException) -> LlmctlError:
    detail = (str(err).splitlines() or [""])[0]
    detail = detail if len(detail) <= 160 else detail[:160] + "..."
    return LlmctlError(
        f"could not fetch the BPE ranks of tiktoken encoding {name!r} (tiktoken downloads them "
        f"from openaipublic.blob.core.windows.net): {type(err).__name__}: {detail}\n"
        f"Offline, pass --tokenizer_file PATH/{name}.tiktoken (a local rank file) or set "
        f"{TIKTOKEN_FILE_ENV}=PATH/{name}.tiktoken (the default gpt2 tokenizer is built in "
        "and needs no download)")


def from_tiktoken_name(name: str) -> TiktokenTokenizer:
    """tiktoken's registered encoding `name` (downloaded, or from tiktoken's cache); gpt2
    is built from the ranks embedded in llmctl, never downloaded."""
    if name == "gpt2":
        return _embedded_gpt2()
    import tiktoken

    names = tiktoken.list_encoding_names()
    if name not in names:
        raise LlmctlError(f"unknown tokenizer: {one_of(name, [*names, 'char', 'byte'])}")
    try:
        encoding = tiktoken.get_encoding(name)
    except (OSError, ValueError, ImportError) as err:  # requests' errors are OSErrors
        raise _download_error(name, err) from None
    # tiktoken keeps these private; without them the spec falls back to the bare name.
    ranks = getattr(encoding, "_mergeable_ranks", None)
    spec: dict[str, Any] = {"kind": "tiktoken", "name": name, "eot_token": EOT_TEXT}
    data = None
    if isinstance(ranks, dict):  # record everything, so rebuilding needs no download
        data = dump_ranks(ranks)
        spec.update(pat_str=encoding._pat_str, special_tokens=dict(encoding._special_tokens),
                    file=RANK_FILE, sha256=hashlib.sha256(data).hexdigest())
    return TiktokenTokenizer(encoding, spec, data)


def tiktoken_from_spec(spec: dict[str, Any], folder: Path | None) -> Tokenizer:
    name = spec.get("name")
    if not isinstance(name, str):
        raise LlmctlError("tiktoken tokenizer spec has no 'name'")
    rel = spec.get("file")
    if not rel:  # a bare name: tiktoken's registry (or the local rank file in the env var)
        env = os.environ.get(TIKTOKEN_FILE_ENV)
        return from_rank_file(Path(env), name) if env else from_tiktoken_name(name)
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise LlmctlError(f"tokenizer spec file {rel!r} must be relative to its folder")
    for key in ("pat_str", "special_tokens", "sha256"):
        if key not in spec:
            raise LlmctlError(f"tiktoken tokenizer spec with a file lacks {key!r}")
    candidates = [folder / rel] if folder is not None else []
    if os.environ.get(TIKTOKEN_FILE_ENV):
        candidates.append(Path(os.environ[TIKTOKEN_FILE_ENV]))
    for path in candidates:
        if path.exists():  # what is there but not a regular file is refused by the reader
            data = _read_rank_file(path)
            if hashlib.sha256(data).hexdigest() == spec["sha256"]:
                ranks = parse_ranks(data, str(path))
                special = {str(k): int(v) for k, v in spec["special_tokens"].items()}
                encoding = _encoding(name, spec["pat_str"], ranks, special)
                return TiktokenTokenizer(encoding, dict(spec), data)
            if path == candidates[0] and folder is not None:
                raise LlmctlError(f"{path} does not match the sha256 its spec records (the "
                                  "tokenizer file was changed or corrupted)")
    if name == "gpt2" and spec["sha256"] == _R50K_SHA:  # the ranks llmctl embeds
        return _embedded_gpt2()
    where = f"{folder / rel}" if folder is not None else f"{rel!r} (no folder given)"
    raise LlmctlError(f"tokenizer rank file {where} is missing; copy the dataset's or "
                      f"checkpoint's {rel} there, or set {TIKTOKEN_FILE_ENV} to a rank file "
                      f"with sha256 {spec['sha256'][:12]}...")
