"""Checkpoint folders: safe to write (temp folder + rename), safe to read (no unpickling).

A checkpoint is a folder holding
  model.safetensors    weights (fp32), tied tensors stored once
  config.json          {"format", "llmctl_version", "config": RunConfig.to_dict(), "step",
                        "metrics", "tokenizer", "created"}
  optimizer.pt         optimizer state, for resume (read with weights_only=True)
  trainer_state.json   everything else resume needs (RNG, data sampler, best val, wandb id)
plus any tokenizer files the tokenizer spec names (e.g. a .tiktoken rank file).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..config import ConfigError, RunConfig, load_config
from ..core.bounds import loads_json
from ..core.errors import LlmctlError
from ..core.files import CHECKPOINT_JSON_LIMIT, move, read_user_file, swap_folder, write_json_atomic
from .checkpoint_data import CheckpointError, check_config_json, check_trainer_state
from .weights_header import check_header

if TYPE_CHECKING:
    import torch

FORMAT = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
OPTIMIZER = "optimizer.pt"
OPTIMIZER_SIZE_FACTOR = 3  # times the size of the folder's weights, plus the slack below
OPTIMIZER_SLACK = 64 << 20  # step counts, names and archive records
TRAINER_STATE = "trainer_state.json"
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


@dataclass
class CheckpointInfo:
    path: Path
    run: RunConfig
    step: int
    metrics: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _dedupe_tied(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict[str, str]]:
    """Tensors sharing storage (tied embeddings) are stored once; aliases map name -> kept name."""
    kept: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen and tensor.numel() > 0:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = tensor.detach().to("cpu").contiguous()
    return kept, aliases


def save_checkpoint(path: str | os.PathLike, *, state_dict: Mapping[str, torch.Tensor] | None,
                    run: RunConfig, step: int, metrics: Mapping[str, Any] | None = None,
                    tokenizer: Mapping[str, Any] | None = None, files: Iterable[Path] = (),
                    optimizer_state: Mapping[str, Any] | None = None,
                    trainer_state: Mapping[str, Any] | None = None,
                    tensor_files: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                    json_files: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically; the previous one at `path` survives any crash.

    Written into a hidden temp folder, then swapped in with renames. Between the two renames
    the previous checkpoint lives on as `.NAME.old`: readers (`resolve_checkpoint`) read it
    in place, and the next save, the only renamer, puts it back first.
    `files` (e.g. tokenizer rank files) are copied in beside the weights. An adapter
    checkpoint passes `state_dict=None` (no model.safetensors) and its adapter as
    `tensor_files` / `json_files` ({file name: content}); `extra` adds keys to config.json
    (e.g. where the run started).
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    parent = path.parent
    tmp, old = parent / f".{path.name}.tmp", parent / f".{path.name}.old"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() and (old / CONFIG).is_file():
            move(old, path)  # an earlier save stopped between its two renames
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if state_dict is not None:
            tensors, aliases = _dedupe_tied(state_dict)
            save_file(tensors, str(tmp / WEIGHTS), metadata={
                "format": str(FORMAT), "aliases": json.dumps(aliases)})
        for name, content in (tensor_files or {}).items():
            save_file({k: v.detach().to("cpu").contiguous() for k, v in content.items()},
                      str(tmp / name))
        for name, content in (json_files or {}).items():
            write_json_atomic(tmp / name, content)
        for src in files:
            shutil.copyfile(src, tmp / Path(src).name)
        if optimizer_state is not None:
            torch.save(dict(optimizer_state), tmp / OPTIMIZER)
        if trainer_state is not None:
            write_json_atomic(tmp / TRAINER_STATE, trainer_state)
        write_json_atomic(tmp / CONFIG, {
            "format": FORMAT,
            "llmctl_version": __version__,
            "config": run.to_dict(),
            "step": int(step),
            "metrics": dict(metrics or {}),
            "tokenizer": dict(tokenizer) if tokenizer is not None else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **dict(extra or {}),
        })
        mode = 0o666 & ~_umask()  # safetensors writes 0600; give every file the usual mode
        for name in os.listdir(tmp):
            os.chmod(tmp / name, mode)
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        shutil.rmtree(old, ignore_errors=True)
        swap_folder(tmp, path, old)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError, RuntimeError) as err:
        # RuntimeError: torch.save's writer reports I/O failures (e.g. a full disk) that way
        shutil.rmtree(tmp, ignore_errors=True)
        if not path.exists() and old.exists():
            move(old, path)
        reason = getattr(err, "strerror", None) or str(err)
        raise CheckpointError(f"could not write checkpoint {path}: {reason}; the previous "
                              "checkpoint (if any) is intact") from None
    return path


# ------------------------------------------------------------------------------ reading


def _looks_like_pickle(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    # protocol-2+ pickles start with 0x80; torch.save writes a zip archive ("PK")
    return head[:1] == b"\x80" or head[:2] == b"PK"


def _foreign_pickles(folder: Path) -> list[Path]:
    """Pickled weight files (e.g. a nanoGPT ckpt.pt), not our own weights_only optimizer.pt."""
    return sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES
                  and p.name != OPTIMIZER)


def _refuse_pickle(path: Path) -> None:
    raise CheckpointError(
        f"{path} is a pickle file; llmctl never unpickles weights (a pickle can run arbitrary "
        f"code). Point at a checkpoint folder holding {WEIGHTS} and {CONFIG}.")


def has_checkpoint(path: str | os.PathLike) -> bool:
    """Whether a checkpoint exists at `path`, counting one that a save is swapping in (its
    previous version waits as `.NAME.old` between the two renames)."""
    path = Path(path)
    return (path / CONFIG).is_file() or (path.parent / f".{path.name}.old" / CONFIG).is_file()


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder for `path`: a checkpoint, or a run folder (best, else latest)."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix in _PICKLE_SUFFIXES or _looks_like_pickle(path):
            _refuse_pickle(path)
        if path.name in (CONFIG, WEIGHTS):
            return resolve_checkpoint(path.parent)
        raise CheckpointError(f"{path} is a file; expected a checkpoint folder (with {CONFIG} "
                              f"and {WEIGHTS}) or a run folder")
    if not path.exists():
        old = path.parent / f".{path.name}.old"
        if (old / CONFIG).is_file():
            # A save is between its two renames (or stopped there): read the previous
            # checkpoint where it is. Only the writer renames, so readers never race it.
            return old
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder")
    if (path / CONFIG).is_file():
        return path
    for name in ("best", "latest"):
        if (path / name / CONFIG).is_file() or (path / f".{name}.old" / CONFIG).is_file():
            return resolve_checkpoint(path / name)
    pickles = _foreign_pickles(path)
    if pickles and not (path / WEIGHTS).exists():
        _refuse_pickle(pickles[0])
    raise CheckpointError(f"{path} is not a checkpoint: {CONFIG} is missing (and there is no "
                          "best/ or latest/ checkpoint inside; `llmctl train` saves them only "
                          "with --save_model)")


def read_checkpoint_json(file: Path) -> Any:
    """A JSON file of a checkpoint, read with the bound for checkpoint JSON (size, depth)."""
    try:
        text = read_user_file(file, "checkpoint file", CHECKPOINT_JSON_LIMIT)
        return loads_json(text, str(file))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not JSON (at line {err.lineno}, column "
                              f"{err.colno}: {err.msg}); the checkpoint is damaged") from None
    except LlmctlError as err:
        raise CheckpointError(str(err)) from None


def read_trainer_state(folder: Path) -> dict[str, Any] | None:
    """The validated trainer_state.json of a checkpoint folder (None when it has none)."""
    file = folder / TRAINER_STATE
    if not file.exists() and not file.is_symlink():
        return None
    state = read_checkpoint_json(file)
    check_trainer_state(state, file)
    return state


def read_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Config, step, metrics and tokenizer spec of a checkpoint (weights are not read)."""
    folder = resolve_checkpoint(path)
    raw = read_checkpoint_json(folder / CONFIG)
    if not isinstance(raw, dict) or not isinstance(raw.get("config"), dict):
        raise CheckpointError(f"{folder / CONFIG} has no 'config' section; not an llmctl "
                              "checkpoint")
    check_config_json(raw, folder / CONFIG, FORMAT)
    try:
        run = load_config(raw["config"], check_batch_split=False)
    except ConfigError as err:
        raise CheckpointError(f"{folder / CONFIG} holds an invalid config:\n{err}") from None
    return CheckpointInfo(path=folder, run=run, step=int(raw.get("step", 0)),
                          metrics=raw.get("metrics") or {}, tokenizer=raw.get("tokenizer"),
                          raw=raw)


def model_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of the model `config` (a ModelConfig) describes, without its
    memory (built on the meta device)."""
    from ..model.costs import build_meta_model

    return {name: tuple(t.shape) for name, t in build_meta_model(config).state_dict().items()}


def read_weights(folder: Path, shapes: Mapping[str, tuple[int, ...]] | None = None
                 ) -> dict[str, torch.Tensor]:
    """The state dict stored in `folder`, aliases (tied tensors) restored. Its names, shapes
    and dtypes must be `shapes` (default: the model the folder's config.json describes);
    every mismatch is listed, and no tensor is read before the header fits."""
    from safetensors import SafetensorError, safe_open

    file = folder / WEIGHTS
    if not file.is_file():
        pickles = _foreign_pickles(folder)
        if pickles:
            _refuse_pickle(pickles[0])
        raise CheckpointError(f"{file} is missing")
    if shapes is None:
        shapes = model_shapes(read_checkpoint(folder).run.model)
    aliases = check_header(file, shapes)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{file} is truncated or corrupted ({err}); restore it from a "
                              "good copy or use another checkpoint") from None
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors


def load_weights(folder: Path, model: torch.nn.Module) -> None:
    """Load weights into `model`; anything but an exact fit is refused, every mismatch listed."""
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    model.load_state_dict(read_weights(folder, shapes), strict=True)


def load_model(path: str | os.PathLike, device: str = "cpu"):
    """(model in eval mode on `device`, CheckpointInfo) from a checkpoint or run folder."""
    from ..model import LLM

    info = read_checkpoint(path)
    model = LLM(info.run.model)
    load_weights(info.path, model)
    model.to(device)
    model.eval()
    return model, info


def load_training_state(path: str | os.PathLike) -> tuple[dict | None, dict]:
    """(optimizer state or None, trainer state) of a checkpoint, for resume."""
    import torch

    folder = resolve_checkpoint(path)
    file = folder / OPTIMIZER
    optimizer_state = None
    if file.exists() or file.is_symlink():
        if not file.is_file():
            raise CheckpointError(f"{file} is not a regular file")
        # AdamW keeps two tensors per trained parameter (Muon one), and the trained
        # parameters are the weights or a LoRA adapter: a bigger file is not our state
        stored = sum(p.stat().st_size for p in folder.glob("*.safetensors") if p.is_file())
        limit = OPTIMIZER_SIZE_FACTOR * stored + OPTIMIZER_SLACK
        size = file.stat().st_size
        if size > limit:
            raise CheckpointError(f"{file} holds {size:,} bytes; the optimizer state of "
                                  f"these weights takes at most {limit:,}")
        try:
            optimizer_state = torch.load(file, weights_only=True, map_location="cpu")
        except Exception as err:  # weights_only refuses anything but tensors and containers
            raise CheckpointError(f"{file} cannot be read safely: {err}") from None
    trainer_state = read_trainer_state(folder) or {}
    return optimizer_state, trainer_state
