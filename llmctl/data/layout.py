"""The on-disk layout of a prepared dataset: `DATA_DIR/NAME/{train.bin,val.bin,meta.json}`.

meta.json is written last, so a folder without a readable meta.json is never a finished
dataset. Token files are flat little-endian `uint16` (vocabulary <= 65536) or `uint32`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ..core.errors import LlmctlError, preview
from ..core.files import DATASET_META_LIMIT, read_user_file
from .registry import DATASETS
from .tokenizer_base import MAX_TOKEN_ID, spec_problems

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
DTYPES = ("uint16", "uint32")
DEFAULT_DATA_DIR = "data"
MAX_SPLIT_TOKENS = 2**48  # far beyond any disk; keeps byte sizes exact integers
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def split_file(split: str) -> str:
    return f"{split}.bin"


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest token dtype holding ids 0 .. vocab_size-1."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def check_name(name: str) -> str:
    """A dataset name is one plain folder name (no separators, no leading dot)."""
    if not _NAME.fullmatch(name or "") or name in (".", ".."):
        raise LlmctlError(f"dataset name {name!r} must be a plain folder name (letters, digits, "
                          "'.', '_', '-'; not starting with '.')")
    return name


def prepare_hint(name: str, data_dir: str | Path) -> str:
    """The `llmctl prepare ...` command that creates DATA_DIR/NAME."""
    extra = "" if str(data_dir) == DEFAULT_DATA_DIR else f" --data_dir {data_dir}"
    if name in DATASETS:
        return f"llmctl prepare {name}{extra}"
    return f"llmctl prepare --source PATH --name {name}{extra}"


def read_meta(folder: Path) -> dict[str, Any]:
    """meta.json of a prepared dataset folder, checked for the keys readers rely on."""
    path = folder / META_FILE
    if not path.exists() and not path.is_symlink():
        raise LlmctlError(f"{folder} has no {META_FILE}: it is not a finished dataset (an "
                          f"interrupted prepare?); run `{prepare_hint(folder.name, folder.parent)}"
                          " --force`")
    try:  # bounded, regular files only: a FIFO or a device named meta.json must not hang
        meta = json.loads(read_user_file(path, "dataset description", DATASET_META_LIMIT))
    except (LlmctlError, json.JSONDecodeError) as err:
        raise LlmctlError(f"{path} is unreadable or corrupt ({err}); run "
                          f"`{prepare_hint(folder.name, folder.parent)} --force`") from None
    problems = _meta_problems(meta)
    if problems:
        raise LlmctlError(f"{path} is not a valid dataset description: {'; '.join(problems)}; "
                          f"run `{prepare_hint(folder.name, folder.parent)} --force`")
    return meta


def _meta_problems(meta: Any) -> list[str]:
    """Every problem with meta.json as data: each field a reader uses, by type and range."""
    if not isinstance(meta, dict):
        return ["not a JSON object"]
    version = meta.get("format")
    if not _whole(version, 0, 2**31):
        return ["no integer 'format'"]
    if version > FORMAT_VERSION:
        return [f"format {version} is newer than this llmctl reads ({FORMAT_VERSION}); "
                "upgrade llmctl"]
    problems = [f"missing '{key}'" for key in ("tokenizer", "vocab_size", "eot_id", "dtype",
                                               "splits") if key not in meta]
    if "tokenizer" in meta:
        problems += spec_problems(meta["tokenizer"])
        rel = meta["tokenizer"].get("file") if isinstance(meta["tokenizer"], dict) else None
        if isinstance(rel, str) and Path(rel).name != rel:  # checkpoints copy it by its name
            problems.append(f"tokenizer.file must be a plain file name, got {preview(rel)}")
    vocab = meta.get("vocab_size")
    if "vocab_size" in meta and not _whole(vocab, 1, MAX_TOKEN_ID + 1):
        problems.append(f"vocab_size must be a whole number in [1, {MAX_TOKEN_ID + 1}], got "
                        f"{preview(vocab)}")
        vocab = None
    top = (vocab if vocab is not None else MAX_TOKEN_ID + 1) - 1
    if "eot_id" in meta and not _whole(meta["eot_id"], 0, top):
        problems.append(f"eot_id must be a whole number in [0, {top}] (below vocab_size), got "
                        f"{preview(meta['eot_id'])}")
    if meta.get("dtype") not in DTYPES:
        problems.append(f"dtype {preview(meta.get('dtype'))} is not one of {', '.join(DTYPES)}")
    top = 2**16 - 1 if meta.get("dtype") == "uint16" else MAX_TOKEN_ID  # what the files hold
    if "max_token_id" in meta and not _whole(meta["max_token_id"], 0, top):
        problems.append(f"max_token_id must be a whole number in [0, {top}], got "
                        f"{preview(meta['max_token_id'])}")
    chat = meta.get("data_format")
    if chat not in (None, "text", "chat"):
        problems.append(f"data_format {preview(chat)} is not one of text, chat")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not splits:
        problems.append("'splits' is not a non-empty object")
    else:
        for split, entry in splits.items():
            problems += _split_problems(str(split), entry, chat == "chat")
    return problems


def _split_problems(split: str, entry: Any, chat: bool) -> list[str]:
    if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
            and _whole(entry.get("tokens"), 0, MAX_SPLIT_TOKENS)):
        return [f"splits.{split} needs 'file' and a token count 'tokens' (a whole number in "
                f"[0, {MAX_SPLIT_TOKENS}])"]
    problems = []
    for key in ("file", "mask", "offsets") if chat else ("file",):
        rel = entry.get(key)
        if not (isinstance(rel, str) and rel and Path(rel).name == rel and rel not in (".", "..")):
            problems.append(f"splits.{split}.{key} must be a plain file name inside the dataset "
                            f"folder, got {preview(rel)}")
    if chat and not _whole(entry.get("conversations"), 0, entry["tokens"]):
        problems.append(f"splits.{split}.conversations must be a whole number in "
                        f"[0, {entry['tokens']}] (at most its tokens), got "
                        f"{preview(entry.get('conversations'))}")
    return problems


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def sha256_file(path: Path, start: int = 0, length: int | None = None) -> str:
    """sha256 of a file (or of `length` bytes from `start`), read in blocks."""
    digest = hashlib.sha256()
    remaining = length
    with open(path, "rb") as f:
        f.seek(start)
        while remaining is None or remaining > 0:
            block = f.read(1 << 22 if remaining is None else min(1 << 22, remaining))
            if not block:
                break
            digest.update(block)
            if remaining is not None:
                remaining -= len(block)
    return digest.hexdigest()


def check_split_files(folder: Path, meta: dict[str, Any]) -> None:
    """Every split file exists with exactly the size meta.json records."""
    itemsize = 2 if meta["dtype"] == "uint16" else 4
    hint = f"run `{prepare_hint(folder.name, folder.parent)} --force`"
    for split, entry in meta["splits"].items():
        path = folder / entry["file"]
        try:
            size = path.stat().st_size
        except OSError:
            raise LlmctlError(f"{path} ({split} split) is missing; {hint}") from None
        expected = entry["tokens"] * itemsize
        if size != expected:
            raise LlmctlError(f"{path} has {size} bytes but meta.json records {entry['tokens']} "
                              f"{meta['dtype']} tokens ({expected} bytes): it was truncated or "
                              f"replaced; {hint}")
