"""`--init_from hf:PATH`: a transformers folder becomes an llmctl checkpoint, then a new run
starts from it like from any checkpoint (train/init.py does the rest)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ..core.errors import LlmctlError
from .hf_import import is_hf_path, load_hf

IMPORT_FOLDER = "init_from_hf"  # inside the run folder: the imported checkpoint


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
                                                 "family": imported.family}})
    return folder


def resolve_hf_init(init_from: str | None, run_folder: Path,
                    overrides: dict[str, Any]) -> dict[str, Any]:
    """The flags with `init_from` pointing at the imported checkpoint when it names
    `hf:PATH` (a flag, or a config file's key: the flag then wins); unchanged otherwise."""
    if not init_from or not is_hf_path(init_from):
        return overrides
    folder = checkpoint_from_hf(init_from, run_folder / IMPORT_FOLDER)
    return {**overrides, "init_from": str(folder)}
