"""The run folder (out_dir/file_name) and finding / vetting the checkpoint to resume from."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from ..config import BlockConfig, LLMConfig, RunConfig
from ..core.errors import LlmctlError
from ..runtime.checkpoint import CONFIG, CheckpointError, CheckpointInfo, read_checkpoint, resolve_checkpoint

LATEST, BEST = "latest", "best"


def run_dir(run: RunConfig) -> Path:
    return Path(run.train.out_dir).expanduser() / run.train.file_name


def prepare_run_dir(path: Path) -> Path:
    """Create the run folder and prove it is writable (before any training time is spent)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise LlmctlError(f"cannot write to the run folder {path}: {reason} (choose another "
                          "--out_dir)") from None
    return path


def check_fresh_start(folder: Path, *, set_aside_metrics: bool) -> None:
    """Before a run that resumes nothing: refuse a folder holding an earlier run's
    checkpoints (mixing them would leave e.g. a stale best/ that sample and eval pick), and
    set an earlier metrics.jsonl aside rather than appending to it. Nothing is deleted."""
    earlier = [name for name in (LATEST, BEST) if (folder / name / CONFIG).is_file()
               or (folder / f".{name}.old" / CONFIG).is_file()]
    if earlier:
        raise LlmctlError(
            f"the run folder {folder} already holds checkpoints of an earlier run "
            f"({', '.join(n + '/' for n in earlier)}): continue it with --resume auto, or start "
            "a new run under another --file_name (or --out_dir), or remove the folder")
    metrics = folder / "metrics.jsonl"
    if set_aside_metrics and metrics.is_file():
        stamp = int(metrics.stat().st_mtime)
        aside = folder / f"metrics.{stamp}.jsonl"
        n = 1
        while aside.exists():
            aside, n = folder / f"metrics.{stamp}-{n}.jsonl", n + 1
        metrics.rename(aside)


def resume_target(resume: str | None, folder: Path) -> Path | None:
    """The checkpoint folder `--resume` names, or None to start fresh.

    'auto' means the run folder's latest checkpoint, and a fresh start when there is none
    yet (so the same command line can be rerun after a crash). A run folder means its
    latest. Anything else must be a checkpoint.
    """
    if not resume:
        return None
    if resume == "auto":
        has_latest = (folder / LATEST / CONFIG).is_file() or (
            folder / f".{LATEST}.old" / CONFIG).is_file()
        return resolve_checkpoint(folder / LATEST) if has_latest else None
    path = Path(resume).expanduser()
    if path.is_dir() and not (path / CONFIG).is_file() and (
            (path / LATEST / CONFIG).is_file() or (path / f".{LATEST}.old" / CONFIG).is_file()):
        path = path / LATEST
    try:
        return resolve_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"--resume {resume}: {err}") from None


def read_resume_checkpoint(path: Path) -> CheckpointInfo:
    try:
        return read_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"cannot resume from {path}: {err}") from None


# Model settings that do not change the architecture (a resume may change them).
_NOT_ARCHITECTURE = {"dropout", "init_std", "layers"}
# coeff / alpha / gamma weigh the balancing losses and bias steps: tunable on resume.
# aux_free is not: it switches the router's scoring (and its bias buffer).
_MOE_KEYS = ("n_exp", "n_shared", "n_act", "aux_free")


def _block_view(block: BlockConfig) -> dict[str, object]:
    """The settings of a block that matter for its kind (gqa ignores q_latent_dim, ...)."""
    view = {"attn": block.attn, "n_head": block.n_head, "kv_heads": block.kv_heads,
            "moe": block.moe, "up_dim": block.up_dim, "non_linearity": block.non_linearity}
    if block.attn == "mla":
        view.update(q_latent_dim=block.q_latent_dim, kv_latent_dim=block.kv_latent_dim,
                    rope_head_dim=block.rope_head_dim)
    if block.moe:
        view.update({key: getattr(block, key) for key in _MOE_KEYS})
    return view


def architecture_differences(saved: LLMConfig, current: LLMConfig) -> list[str]:
    """Human-readable architecture differences between two model configs (empty: same)."""
    out = []
    for f in dataclasses.fields(LLMConfig):
        if f.name in _NOT_ARCHITECTURE:
            continue
        a, b = getattr(saved, f.name), getattr(current, f.name)
        if a != b:
            out.append(f"{f.name}: checkpoint {a!r}, now {b!r}")
    if len(saved.layers) == len(current.layers):
        for i, (a, b) in enumerate(zip(saved.layers, current.layers, strict=True)):
            va, vb = _block_view(a), _block_view(b)
            out += [f"layers[{i}].{key}: checkpoint {va.get(key)!r}, now {vb.get(key)!r}"
                    for key in dict.fromkeys([*va, *vb]) if va.get(key) != vb.get(key)]
    return out


def check_same_architecture(info: CheckpointInfo, current: LLMConfig) -> None:
    diffs = architecture_differences(info.run.model, current)
    if diffs:
        shown = "\n  ".join(diffs[:12]) + (f"\n  ... {len(diffs) - 12} more"
                                            if len(diffs) > 12 else "")
        raise LlmctlError(f"cannot resume from {info.path}: it holds a different model "
                          f"architecture:\n  {shown}\nresume with the checkpoint's model "
                          "settings (or start a new run with another --file_name)")
