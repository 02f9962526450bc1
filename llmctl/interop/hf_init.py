"""`--init_from hf:PATH`: a transformers folder becomes an llmctl checkpoint, then a new run
starts from it like from any checkpoint (train/init.py does the rest).

Every process of a job may ask for the import (a hand-started `torchrun ... -m llmctl train
--init_from hf:PATH` runs the command line once per rank): under an exclusive lock on
RUN_FOLDER/.init_from_hf.lock, the first one imports, the others find the finished folder
(its recorded source fingerprint equal to the source's now) and use it. An import of another
or since-changed source is redone. The import is deterministic, so which rank does it does
not matter."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.errors import LlmctlError
from ..core.files import CHECKPOINT_JSON_LIMIT, open_regular, read_user_file
from .hf_import import hf_folder, is_hf_path, load_hf

IMPORT_FOLDER = "init_from_hf"  # inside the run folder: the imported checkpoint
IMPORT_LOCK = ".init_from_hf.lock"  # beside it: one process imports at a time


def checkpoint_from_hf(path: str, folder: Path) -> Path:
    """Write the model of `hf:PATH` (weights, config, tokenizer) as an llmctl checkpoint at
    `folder` (atomically) and return it."""
    from ..runtime.checkpoint import save_checkpoint

    imported = load_hf(path)
    if imported.tokenizer_spec.get("kind") == "transformers":
        raise LlmctlError(
            f"--init_from {path}: its tokenizer has no tokenizer.json (a slow tokenizer only), "
            "so no dataset could be prepared with it; load it with transformers and "
            "save_pretrained it (that writes tokenizer.json), then prepare the data with "
            f"--tokenizer {path}")
    with tempfile.TemporaryDirectory() as tmp:
        imported.tokenizer.save_files(Path(tmp))
        files = sorted(Path(tmp).iterdir())
        save_checkpoint(folder, state_dict=imported.state_dict, run=imported.run,
                        step=imported.step, tokenizer=imported.tokenizer_spec, files=files,
                        extra={"imported_from": {"path": str(imported.path),
                                                 "family": imported.family,
                                                 "fingerprint": source_fingerprint(path)}})
    return folder


def source_fingerprint(path: str) -> str:
    """What identifies a transformers folder's content cheaply: its config.json and the
    names, sizes and modification times of its files."""
    folder = hf_folder(path)
    digest = hashlib.sha256(read_user_file(folder / "config.json", "transformers config",
                                           CHECKPOINT_JSON_LIMIT, text=False))
    for entry in sorted(folder.iterdir()):
        if entry.is_file():
            info = entry.stat()
            digest.update(f"{entry.name}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _imported_already(path: str, folder: Path) -> bool:
    try:
        raw = json.loads(read_user_file(folder / "config.json", "checkpoint config",
                                        CHECKPOINT_JSON_LIMIT))
    except (LlmctlError, ValueError):
        return False
    done = raw.get("imported_from") if isinstance(raw, dict) else None
    return isinstance(done, dict) and done.get("path") == str(hf_folder(path)) and \
        done.get("fingerprint") == source_fingerprint(path)


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """An exclusive flock on `lock` (blocking; the OS drops it if the holder dies)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = open_regular(lock, os.O_RDWR | os.O_CREAT, "the import lock")  # never via a symlink
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def import_once(path: str, folder: Path) -> Path:
    """`checkpoint_from_hf(path, folder)` unless `folder` already holds that import; safe for
    several processes at once (they wait for the first)."""
    hf_folder(path)  # a missing source: a clean error before any folder is made
    with _exclusive(folder.parent / IMPORT_LOCK):
        if not _imported_already(path, folder):
            checkpoint_from_hf(path, folder)
    return folder


def resolve_hf_init(init_from: str | None, run_folder: Path,
                    overrides: dict[str, Any]) -> dict[str, Any]:
    """The flags with `init_from` pointing at the imported checkpoint when it names
    `hf:PATH` (a flag, or a config file's key: the flag then wins); unchanged otherwise."""
    if not init_from or not is_hf_path(init_from):
        return overrides
    folder = import_once(init_from, run_folder / IMPORT_FOLDER)
    return {**overrides, "init_from": str(folder)}
