"""Foreign tokenizers (kind `hf`): the `tokenizer.json` of a transformers folder (a Llama's,
a Qwen's, ...), run by the Hugging Face `tokenizers` library (the `.[hf]` extra, imported on
first use).

`prepare --tokenizer hf:PATH` (PATH: a transformers folder or a tokenizer.json) tokenizes a
dataset with it and `hf:PATH` imports give a model the same one, so both record the same spec:
`{"kind": "hf", "file": "tokenizer.json", "sha256": ..., "eot_token": ..., "vocab_size": ...}`.
The file itself is copied beside meta.json / into the checkpoint (never an absolute path
that may move), and the sha256 is what `same_tokenizer` compares. The end-of-text token is
the folder's end-of-sequence token (tokenizer_config.json, special_tokens_map.json, then
config.json / generation_config.json), or a well-known one the file defines.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..core.bounds import loads_json
from ..core.errors import LlmctlError
from ..core.extras import require
from ..core.files import read_user_file, write_bytes_atomic
from .tokenizer_base import MAX_TOKENIZER_BYTES, REPLACEMENT, Tokenizer, read_spec_file

KIND = "hf"
PREFIX = "hf:"
HF_FILE = "tokenizer.json"
MAX_CONFIG_BYTES = 16 * 2**20  # tokenizer_config.json may hold chat templates
# end-of-text candidates when the folder does not say (most common first)
KNOWN_EOS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "<|eot_id|>")


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json behind llmctl's Tokenizer interface; `encode` is ordinary
    text (no BOS / EOS added, special-token strings in the text stay text)."""

    kind = KIND

    def __init__(self, data: bytes, eot_token: str, origin: str = HF_FILE) -> None:
        tk = require("tokenizers")
        try:
            self.tok = tk.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:  # the library raises plain Exceptions on a bad file
            first = (str(err).splitlines() or [""])[0][:200]
            raise LlmctlError(f"{origin} is not a valid tokenizer.json: {first}") from None
        self.tok.encode_special_tokens = True
        self.data = data
        vocab = self.tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise LlmctlError(f"{origin} has an empty vocabulary")
        self.vocab_size = max(vocab.values()) + 1
        eot = self.tok.token_to_id(eot_token)
        if eot is None:
            raise LlmctlError(f"{origin} has no end-of-sequence token {eot_token!r}")
        self.eot_id = int(eot)
        self.spec = {"kind": KIND, "file": HF_FILE, "sha256": hashlib.sha256(data).hexdigest(),
                     "eot_token": eot_token, "vocab_size": self.vocab_size}

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        out, run = [], []
        for i in map(int, ids):
            if 0 <= i < self.vocab_size and self.tok.id_to_token(i) is not None:
                run.append(i)
                continue
            out += [self.tok.decode(run, skip_special_tokens=False), REPLACEMENT]
            run = []
        out.append(self.tok.decode(run, skip_special_tokens=False))
        return "".join(out)

    def save_files(self, folder: Path) -> None:
        write_bytes_atomic(Path(folder) / HF_FILE, self.data)


def is_hf_tokenizer(name: str | None) -> bool:
    return bool(name) and str(name).startswith(PREFIX)


def hf_tokenizer_from_path(path: str | Path) -> HFTokenizer:
    """The tokenizer of a transformers folder (its tokenizer.json) or of a tokenizer.json
    file (its folder's configs, if any, name the end-of-sequence token)."""
    target = Path(str(path).removeprefix(PREFIX)).expanduser()
    if target.is_dir():
        folder, file = target, target / HF_FILE
        if not file.is_file():
            raise LlmctlError(
                f"{folder} has no {HF_FILE}: llmctl reads fast tokenizers' {HF_FILE} (load the "
                "tokenizer with transformers and save_pretrained it to write one)")
    else:
        folder, file = target.parent, target
    data = read_user_file(file, "tokenizer file", MAX_TOKENIZER_BYTES, text=False)
    tok = HFTokenizer(data, _eos_token(folder, data, file), str(file))
    return tok


def hf_from_spec(spec: dict[str, Any], folder: Path | None) -> HFTokenizer:
    """The tokenizer a recorded `hf` spec names; its file lies in `folder`."""
    eot = spec.get("eot_token")
    if not isinstance(eot, str):
        raise LlmctlError("hf tokenizer spec has no 'eot_token' string")
    path, data = read_spec_file(spec, folder, "hf")
    return HFTokenizer(data, eot, str(path))


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    text = read_user_file(path, "tokenizer config", MAX_CONFIG_BYTES)
    try:
        data = loads_json(text, str(path))
    except ValueError as err:
        raise LlmctlError(f"{path} is not valid JSON: {err}") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "</s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _eos_token(folder: Path, data: bytes, file: Path) -> str:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        eos = _token_text(_json(folder / name).get("eos_token"))
        if eos:
            return eos
    try:
        parsed = loads_json(data.decode("utf-8"), str(file))
    except (ValueError, UnicodeDecodeError) as err:
        raise LlmctlError(f"{file} is not a valid tokenizer.json: {err}") from None
    added = parsed.get("added_tokens") if isinstance(parsed, dict) else None
    by_id = {t.get("id"): t.get("content") for t in added or [] if isinstance(t, dict)}
    for name in ("config.json", "generation_config.json"):
        ids = _json(folder / name).get("eos_token_id")
        first = ids[0] if isinstance(ids, list) and ids else ids
        if isinstance(first, int) and isinstance(by_id.get(first), str):
            return by_id[first]
    for candidate in KNOWN_EOS:
        if candidate in by_id.values():
            return candidate
    raise LlmctlError(f"cannot tell the end-of-sequence token of {file}: put a "
                      "tokenizer_config.json with \"eos_token\" beside it")
