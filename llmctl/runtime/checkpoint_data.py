"""A checkpoint's metadata validated as data: every field of config.json and
trainer_state.json by type and range, and optimizer state against the model it is loaded
into (before `load_state_dict`, which trusts shapes and can crash the process on a wrong one).

Each check raises CheckpointFieldError naming the file and the field; runtime.checkpoint
calls these for every reader (sample, eval, inspect-params, resume).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import LlmctlError, preview

if TYPE_CHECKING:
    import torch

MAX_STEP = 2**53
_WANDB_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_OPTIMIZER_TENSORS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
_MT_WORDS = 624  # Mersenne Twister state words (Python's and NumPy's)


class CheckpointError(LlmctlError):
    """A checkpoint that cannot be used: missing, damaged, or not of this model."""


class CheckpointFieldError(CheckpointError):
    def __init__(self, file: Path, field: str, message: str):
        super().__init__(f"{file}: field '{field}' {message}")


class _Fields:
    """Typed access to one JSON object, every failure naming file and dotted field."""

    def __init__(self, file: Path, data: Any, prefix: str = ""):
        self.file, self.prefix = file, prefix
        if not isinstance(data, Mapping):
            where = prefix.rstrip(".") or "(top level)"
            raise CheckpointFieldError(file, where, f"must be a JSON object, got "
                                       f"{_kind(data)}")
        self.data = data

    def fail(self, key: str, message: str) -> None:
        raise CheckpointFieldError(self.file, self.prefix + key, message)

    def get(self, key: str, required: bool) -> Any:
        if key not in self.data:
            if required:
                self.fail(key, "is missing")
            return None
        return self.data[key]

    def integer(self, key: str, low: int = 0, high: int = MAX_STEP, required: bool = True,
            default: int | None = None) -> int | None:
        value = self.get(key, required)
        if value is None and not required:
            return default
        if not _is_int(value) or not low <= value <= high:
            self.fail(key, f"must be a whole number in [{low}, {high}], got {preview(value)}")
        return value

    def number(self, key: str, low: float = -math.inf, required: bool = False,
               nullable: bool = True) -> float | None:
        value = self.get(key, required)
        if value is None and (nullable or key not in self.data):
            return None
        if not _is_number(value) or not math.isfinite(value) or value < low:
            bound = f" >= {low:g}" if low > -math.inf else ""
            self.fail(key, f"must be a finite number{bound}, got {preview(value)}")
        return float(value)

    def mapping(self, key: str, required: bool = True, nullable: bool = False) -> Any:
        value = self.get(key, required)
        if value is None and (nullable or not required):
            return None
        if not isinstance(value, Mapping):
            self.fail(key, f"must be a JSON object, got {_kind(value)}")
        return value

    def string(self, key: str, required: bool = False, nullable: bool = True) -> str | None:
        value = self.get(key, required)
        if value is None and nullable:
            return None
        if not isinstance(value, str) or len(value) > 200:
            self.fail(key, f"must be a short string, got {preview(value)}")
        return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null",
            bool: "true/false"}.get(type(value), f"{preview(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------- config.json


def check_config_json(raw: Any, file: Path, newest_format: int) -> None:
    """Every field of a checkpoint's config.json (the run config itself is checked by the
    config loader afterwards)."""
    f = _Fields(file, raw)
    fmt = f.get("format", required=False)
    if fmt is not None:
        if not _is_int(fmt) or fmt < 1:
            f.fail("format", f"must be a format number >= 1, got {preview(fmt)}")
        if fmt > newest_format:
            raise LlmctlError(f"{file.parent} was written by a newer llmctl (format {fmt}); "
                              "upgrade llmctl to read it")
    f.mapping("config")
    f.integer("step", required=False, default=0)
    metrics = f.mapping("metrics", required=False, nullable=True) or {}
    m = _Fields(file, metrics, "metrics.")
    for key in metrics:
        if not isinstance(key, str) or len(key) > 100:
            f.fail("metrics", f"has a key that is not a short name: {preview(key)}")
        m.number(key)
    tokenizer = f.mapping("tokenizer", required=False, nullable=True)
    if tokenizer is not None:
        from ..data.tokenizer_base import spec_problems

        problems = spec_problems(tokenizer)
        if problems:
            raise CheckpointError(f"{file}: the tokenizer is not valid: {'; '.join(problems)}")
    f.string("llmctl_version")
    f.string("created")


# ---------------------------------------------------------------- trainer_state.json


def check_trainer_state(state: Any, file: Path) -> None:
    """Every field resume reads from trainer_state.json, by type and range."""
    f = _Fields(file, state)
    f.integer("step", required=False)
    f.number("best_val")
    f.number("elapsed", low=0.0)
    world = f.integer("world_size", low=1, high=1 << 20, required=False, default=1)
    wandb_id = f.string("wandb_run_id")
    if wandb_id is not None and not _WANDB_ID.match(wandb_id):
        f.fail("wandb_run_id", f"must be a W&B run id (letters, digits, _ . -), got "
               f"{preview(wandb_id)}")
    rngs = f.get("rng", required=False)  # resume requires rng and sampler itself
    if rngs is not None:
        if not isinstance(rngs, list) or not rngs:
            f.fail("rng", f"must be a list of per-rank generator states, got {_kind(rngs)}")
        if "world_size" in state and len(rngs) != world:
            f.fail("rng", f"holds {len(rngs)} rank states but world_size is {world}")
        for rank, rng in enumerate(rngs):
            _check_rng(_Fields(file, rng, f"rng[{rank}]."))
    sampler = _Fields(file, f.mapping("sampler", required=False) or {}, "sampler.")
    sampler.integer("seed", low=-(2**63), high=2**64 - 1, required=False)
    for key in ("samples_drawn", "num_tokens"):
        sampler.integer(key, required=False)
    for key in ("batch_size", "block_size", "world_size", "version"):
        sampler.integer(key, low=1, required=False)
    scaler = _Fields(file, f.mapping("scaler", required=False, nullable=True) or {}, "scaler.")
    for key, value in scaler.data.items():
        if key == "_growth_tracker":
            scaler.integer(key)
        elif _is_number(value):
            scaler.number(key, low=0.0)
        else:
            scaler.fail(str(key), f"must be a number, got {preview(value)}")


def _check_rng(f: _Fields) -> None:
    python = f.get("python", required=True)
    if (not isinstance(python, list) or len(python) != 3 or not _is_int(python[0])
            or not _words(python[1], _MT_WORDS + 1)
            or not (python[2] is None or _is_number(python[2]))):
        f.fail("python", "must be [version, 625 state words, gauss] (random.getstate())")
    numpy = f.get("numpy", required=True)
    if (not isinstance(numpy, list) or len(numpy) != 5 or numpy[0] != "MT19937"
            or not _words(numpy[1], _MT_WORDS) or not _is_int(numpy[2])
            or not 0 <= numpy[2] <= _MT_WORDS or numpy[3] not in (0, 1)
            or not _is_number(numpy[4])):
        f.fail("numpy", "must be ['MT19937', 624 state words, pos, has_gauss, cached] "
               "(numpy.random.get_state())")
    _check_b64(f, "torch", f.get("torch", required=True))
    cuda = f.get("cuda", required=False)
    if cuda is not None:
        if not isinstance(cuda, list):
            f.fail("cuda", f"must be a list of generator states, got {_kind(cuda)}")
        for i, item in enumerate(cuda):
            _check_b64(f, f"cuda[{i}]", item)


def _words(value: Any, count: int) -> bool:
    return (isinstance(value, list) and len(value) == count
            and all(_is_int(w) and 0 <= w < 2**32 for w in value))


def _check_b64(f: _Fields, key: str, value: Any) -> None:
    """A torch generator state: base64 of bytes, the length torch uses for its kind."""
    import torch

    if not isinstance(value, str) or len(value) > 1 << 16:
        f.fail(key, f"must be a base64 generator state, got {preview(value)}")
    try:
        size = len(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):
        f.fail(key, "is not valid base64")
    if key == "torch" and size != torch.get_rng_state().numel():
        f.fail(key, f"holds {size} bytes; a torch CPU generator state is "
               f"{torch.get_rng_state().numel()}")


# ---------------------------------------------------------------- optimizer.pt


def check_optimizer_state(state: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          file: Path) -> None:
    """Optimizer state (keyed by parameter names, as runtime.checkpoint saves it) against the
    optimizer it is loaded into: the same parameter groups holding the same parameters, and
    every state tensor of its parameter's shape and dtype, with a sane step count."""
    import torch

    params = dict(model.named_parameters())  # tied parameters once, under their first name
    names = {id(p): n for n, p in params.items()}
    f = _Fields(file, state)
    groups = f.get("param_groups", required=True)
    ours = optimizer.param_groups
    if not isinstance(groups, list) or len(groups) != len(ours):
        f.fail("param_groups", f"must be a list of {len(ours)} parameter groups, got "
               f"{len(groups) if isinstance(groups, list) else _kind(groups)}")
    for i, (group, our) in enumerate(zip(groups, ours, strict=True)):
        g = _Fields(file, group, f"param_groups[{i}].")
        expected = [names.get(id(p), "?") for p in our["params"]]
        if group.get("params") != expected:
            got = group.get("params")
            shown = (f"{len(got)} parameters" if isinstance(got, list) else _kind(got))
            g.fail("params", f"lists {shown}; this model's group {i} holds {len(expected)} "
                   f"({preview(expected)}): the state is for another model")
        for key in ("lr", "eps", "weight_decay"):
            if key in group:
                g.number(key, low=0.0, nullable=False)
        betas = group.get("betas")
        if betas is not None and (not isinstance(betas, (list, tuple)) or len(betas) != 2
                                  or not all(_is_number(b) and 0 <= b < 1 for b in betas)):
            g.fail("betas", f"must be two numbers in [0, 1), got {preview(betas)}")
    per_param = f.mapping("state")
    for name, entry in per_param.items():
        if name not in params:
            f.fail("state", f"holds an entry for {preview(name)}, which this model does not "
                   "have")
        e = _Fields(file, entry, f"state[{name}].")
        param = params[name]
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                e.fail(str(key), f"must be a tensor, got {_kind(value)}")
            if key == "step":
                if value.numel() != 1 or value.is_complex():
                    e.fail("step", f"must be one number, got shape {tuple(value.shape)}")
                step = float(value.reshape(()).item())
                if not math.isfinite(step) or step < 0 or step > MAX_STEP or step % 1:
                    e.fail("step", f"must be a whole number >= 0, got {step}")
            elif key in _OPTIMIZER_TENSORS:
                if tuple(value.shape) != tuple(param.shape):
                    e.fail(key, f"has shape {tuple(value.shape)}; parameter {name} is "
                           f"{tuple(param.shape)}")
                if value.dtype != param.dtype:
                    e.fail(key, f"has dtype {value.dtype}; parameter {name} is {param.dtype}")
            else:
                e.fail(str(key), "is not an AdamW state entry")
