"""Merging an adapter checkpoint into a plain one (weights only: a start, not a resume)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..core.errors import LlmctlError
from .base_weights import build_adapted
from .checkpoint import CONFIG, read_checkpoint, save_checkpoint
from .lora import has_head_adapter, merge


def merge_checkpoint(ckpt: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Base + adapter of `ckpt` folded into plain weights at `out`; returns `out`."""
    info = read_checkpoint(ckpt)
    if not info.raw.get("adapter"):
        raise LlmctlError(f"{info.path} is not a LoRA checkpoint (it has no adapter); it is "
                          "already plain")
    out = Path(out)
    if out.exists() and not force:
        raise LlmctlError(f"{out} exists; pass --force to replace it")
    if out.exists() and not (out / CONFIG).is_file():
        raise LlmctlError(f"{out} exists and is not a checkpoint; refusing to replace it")
    model, tuner = build_adapted(info.path, info, merge=False)
    if has_head_adapter(model):
        raise LlmctlError(f"{info.path} adapts lm_head, which is tied to the token embedding: "
                          "a plain (tied) checkpoint cannot hold that adapter. Use the adapter "
                          "checkpoint directly (sample / eval / chat load it), or train "
                          "without lm_head in --lora_targets")
    model = merge(tuner, model)
    files = [info.path / name for name in _tokenizer_files(info.tokenizer)]
    raw = dict(info.raw)
    extra = {"merged_from": {"adapter": str(info.path.resolve()),
                             "base": raw["adapter"]["base"]}}
    if raw.get("init_from"):
        extra["init_from"] = raw["init_from"]
    save_checkpoint(out, state_dict=model.state_dict(), run=info.run, step=info.step,
                    metrics=info.metrics, tokenizer=info.tokenizer, files=files, extra=extra)
    shutil.rmtree(out.parent / f".{out.name}.old", ignore_errors=True)
    return out


def _tokenizer_files(spec: dict | None) -> list[str]:
    from ..data.tokenizers import tokenizer_files

    return tokenizer_files(spec or {})
