"""The one config loader: defaults < config files (in order) < flags the user typed."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.bounds import MAX_DEPTH, structure_problem
from ..core.errors import ConfigError, Problem, did_you_mean, preview
from ..core.files import CONFIG_FILE_LIMIT, UserFileError, read_user_file
from .coerce import CoercionError, coerce, field_types
from .schema import (
    BLOCK_FIELDS,
    MODEL_FIELDS,
    TRAIN_FIELDS,
    BlockConfig,
    LLMConfig,
    RunConfig,
    TrainConfig,
)
from .validate import validate

LAYER_FLAGS = ("layer_configs", "layer_configs_jsonl")
REQUIRED_LAYER_KEYS = ("attn", "n_head", "moe", "up_dim", "non_linearity")
ALIASES = {"total_batch_size_str": "total_batch_size"}
SECTION_KEYS = {
    "model": set(MODEL_FIELDS) | set(BLOCK_FIELDS) | set(LAYER_FLAGS) | {"layers"},
    "train": set(TRAIN_FIELDS) | set(ALIASES),
}
FLAT_KEYS = sorted(SECTION_KEYS["model"] - {"layers"} | SECTION_KEYS["train"])
_NULLABLE_TOP = {"model", "train", "layers", *FLAT_KEYS}  # keys where null = not set
MAX_FILE_BYTES = CONFIG_FILE_LIMIT

_TYPES = {"model": field_types(LLMConfig), "block": field_types(BlockConfig),
          "train": field_types(TrainConfig)}


@dataclass
class _Raw:
    """Values gathered from all sources, later sources overriding earlier ones."""

    model: dict[str, tuple[Any, str]] = field(default_factory=dict)
    block: dict[str, tuple[Any, str]] = field(default_factory=dict)
    train: dict[str, tuple[Any, str]] = field(default_factory=dict)
    layers: tuple[list[Any], str] | None = None
    problems: list[Problem] = field(default_factory=list)

    def problem(self, key: str, message: str, origin: str | None) -> None:
        self.problems.append(Problem(key, message, origin))


def load_config(*sources: str | os.PathLike | Mapping[str, Any],
                overrides: Mapping[str, Any] | None = None,
                world_size: int | None = None, check_batch_split: bool = True) -> RunConfig:
    """Resolve sources (paths to YAML/JSON/JSONL files, or dicts) and flag overrides.

    Raises ConfigError listing every problem. `world_size` defaults to $WORLD_SIZE
    (torchrun) and is used to check that total_batch_size splits evenly into micro-batches;
    `check_batch_split=False` skips that check for commands that do not train.
    """
    raw = _Raw()
    for source in sources:
        if isinstance(source, Mapping):
            _read_mapping(raw, source, origin="dict", base_dir=Path.cwd())
        else:
            _read_file(raw, Path(source))
    if overrides:
        flags = {k: v for k, v in overrides.items() if v is not None}
        given = [k for k in LAYER_FLAGS if k in flags]
        if len(given) > 1:
            raw.problem("model.layer_configs", "give only one of --layer_configs and "
                        "--layer_configs_jsonl", "flags")
            flags.pop("layer_configs")
        _read_mapping(raw, flags, origin="flags", base_dir=Path.cwd())
    if world_size is None:
        world_size = _env_world_size()
    run, custom, origins = _build(raw)
    problems = raw.problems + validate(run, custom_layers=custom, world_size=world_size,
                                       origins=origins, check_batch_split=check_batch_split)
    if problems:
        raise ConfigError(problems)
    return run


def _env_world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


# ---------------------------------------------------------------- reading sources


def _read_text(raw: _Raw, path: Path, what: str = "config file") -> str | None:
    label = str(path)
    try:
        text = read_user_file(path, what, MAX_FILE_BYTES)
    except UserFileError as err:
        raw.problem(label, err.reason, None)
        return None
    if "\x00" in text:
        raw.problem(label, "is a binary file, not a YAML/JSON/JSONL config", None)
        return None
    if not text.strip():
        raw.problem(label, "file is empty", None)
        return None
    return text


def _bounded(raw: _Raw, data: Any, key: str, origin: str | None) -> bool:
    """Whether parsed data is within the depth / size bounds (a problem recorded if not)."""
    problem = structure_problem(data)
    if problem:
        raw.problem(key, problem, origin)
    return problem is None


def _read_file(raw: _Raw, path: Path) -> None:
    label = str(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json", ".jsonl"):
        raw.problem(label, f"unsupported config file type {suffix or '(none)'!r}; use .yaml, "
                    ".yml, .json or .jsonl", None)
        return
    text = _read_text(raw, path)
    if text is None:
        return
    if suffix == ".jsonl":
        layers = _parse_jsonl(raw, text, label)
        if layers is not None:
            raw.layers = (layers, label)
        return
    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raw.problem(label, f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}",
                    None)
        return
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        raw.problem(label, f"invalid YAML{where}: {reason}", None)
        return
    except RecursionError:
        raw.problem(label, f"is nested more than {MAX_DEPTH} levels deep", None)
        return
    # PyYAML shares aliased objects, so an alias bomb loads cheaply; the bound counts each
    # use of an alias and refuses it before anything walks or renders the expanded value
    if not _bounded(raw, data, label, None):
        return
    if isinstance(data, list):
        raw.layers = (data, label)
    elif isinstance(data, dict):
        _read_mapping(raw, data, origin=label, base_dir=path.parent)
    else:
        raw.problem(label, "expected a mapping of parameters or a list of layer configs, got "
                    f"{type(data).__name__}", None)


def _parse_jsonl(raw: _Raw, text: str, label: str) -> list[Any] | None:
    layers, ok = [], True
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            layer = json.loads(line)
        except json.JSONDecodeError as err:
            raw.problem(f"{label}:{lineno}", f"invalid JSON: {err.msg}", None)
            ok = False
            continue
        except RecursionError:
            raw.problem(f"{label}:{lineno}", f"is nested more than {MAX_DEPTH} levels deep",
                        None)
            ok = False
            continue
        if not _bounded(raw, layer, f"{label}:{lineno}", None):
            ok = False
            continue
        layers.append(layer)
    return layers if ok else None


def _read_mapping(raw: _Raw, data: Mapping[Any, Any], origin: str, base_dir: Path) -> None:
    """Merge one source's values into `raw`: the one place file values are merged.

    `null` (YAML null / ~ / empty, JSON null) means "not set", as the reference's own YAML
    files write it: the key falls through to the earlier source or the default, exactly as
    if it were absent. Unknown keys are errors even when null.
    """
    layer_sources = []
    for key, value in data.items():
        key = str(key)
        if value is None and key in _NULLABLE_TOP:
            continue
        if key in ("model", "train") and isinstance(value, Mapping):
            for sub_key, sub_value in value.items():
                sub_key = str(sub_key)
                if sub_key in SECTION_KEYS[key]:
                    if sub_value is None:
                        continue
                    if sub_key in ("layers", *LAYER_FLAGS):
                        layer_sources.append((f"{key}.{sub_key}", sub_value))
                    else:
                        _assign(raw, sub_key, sub_value, origin)
                else:
                    other = "train" if key == "model" else "model"
                    hint = (f"; it belongs in the '{other}' section"
                            if sub_key in SECTION_KEYS[other] else "")
                    raw.problem(f"{key}.{sub_key}", "unknown key" + hint + did_you_mean(
                        sub_key, SECTION_KEYS[key]) + _valid_list(SECTION_KEYS[key]), origin)
        elif key in ("layers", *LAYER_FLAGS):
            layer_sources.append((key, value))
        elif key in FLAT_KEYS:
            _assign(raw, key, value, origin)
        else:
            raw.problem(key, "unknown parameter" + did_you_mean(key, FLAT_KEYS) +
                        _valid_list(FLAT_KEYS), origin)
    if len(layer_sources) > 1:
        names = ", ".join(name for name, _ in layer_sources)
        raw.problem("model.layers", f"give only one layer list, got {names}", origin)
    elif layer_sources:
        name, value = layer_sources[0]
        resolved = _resolve_layer_source(raw, name, value, origin, base_dir)
        if resolved is not None:
            raw.layers = resolved


def _valid_list(choices: Any) -> str:
    return "; valid keys: " + ", ".join(sorted(choices))


def _resolve_layer_source(raw: _Raw, name: str, value: Any, origin: str,
                          base_dir: Path) -> tuple[list[Any], str] | None:
    """(layer list, where it came from) from a list, a JSON string or a JSONL path."""
    key = "model." + name.split(".")[-1]
    if name.endswith("layer_configs_jsonl"):
        if not isinstance(value, str):
            raw.problem(key, f"expected a path to a JSONL file, got {preview(value)}", origin)
            return None
        path = Path(value).expanduser()
        if not path.is_absolute() and origin != "flags":
            path = base_dir / path  # paths in a config file are relative to that file
        text = _read_text(raw, path, "layer file")
        layers = None if text is None else _parse_jsonl(raw, text, str(path))
        return None if layers is None else (layers, str(path))
    if isinstance(value, str):  # --layer_configs '[{...}, ...]'
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raw.problem(key, f"invalid JSON: {err.msg} (expected a JSON list of layer dicts)",
                        origin)
            return None
        except RecursionError:
            raw.problem(key, f"is nested more than {MAX_DEPTH} levels deep", origin)
            return None
        if not _bounded(raw, value, key, origin):
            return None
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raw.problem(key, f"expected a list of layer dicts, got {type(value).__name__}", origin)
        return None
    return value, origin


def _assign(raw: _Raw, key: str, value: Any, origin: str) -> None:
    target = ALIASES.get(key, key)
    if target in MODEL_FIELDS:
        raw.model[target] = (value, origin)
    elif target in BLOCK_FIELDS:
        raw.block[target] = (value, origin)
    else:
        raw.train[target] = (value, origin)


# ---------------------------------------------------------------- building dataclasses


def _coerce_all(raw: _Raw, values: dict[str, tuple[Any, str]], types: dict[str, Any],
                prefix: str, origins: dict[str, str]) -> dict[str, Any]:
    out = {}
    for name, (value, origin) in values.items():
        key = f"{prefix}{name}"
        try:
            out[name] = coerce(name, types[name], value)
            origins[key] = origin
        except CoercionError as err:
            raw.problem(key, str(err), origin)
    return out


def _build(raw: _Raw) -> tuple[RunConfig, bool, dict[str, str]]:
    origins: dict[str, str] = {}
    model_values = _coerce_all(raw, raw.model, _TYPES["model"], "model.", origins)
    block_values = _coerce_all(raw, raw.block, _TYPES["block"], "model.", origins)
    train_values = _coerce_all(raw, raw.train, _TYPES["train"], "train.", origins)
    template = BlockConfig(**block_values)

    custom = raw.layers is not None
    if custom:
        layer_dicts, layer_origin = raw.layers
        layers = [_build_layer(raw, i, spec, template, layer_origin, origins)
                  for i, spec in enumerate(layer_dicts)]
        if not layers:
            raw.problem("model.layers", "the layer list is empty", layer_origin)
            layers = [template]
        given = model_values.get("n_layer")
        if given is not None and given != len(layers):
            raw.problem("model.n_layer", f"n_layer={given} but the layer list has "
                        f"{len(layers)} entries (leave n_layer out to take it from the list)",
                        origins.get("model.n_layer"))
        model_values["n_layer"] = len(layers)
    else:
        n_layer = model_values.get("n_layer", MODEL_FIELDS["n_layer"].default)
        count = n_layer if isinstance(n_layer, int) and 0 < n_layer <= 10_000 else 1
        layers = [dataclasses.replace(template) for _ in range(count)]
    model = LLMConfig(**model_values, layers=layers)
    return RunConfig(model=model, train=TrainConfig(**train_values)), custom, origins


def _build_layer(raw: _Raw, index: int, spec: Any, template: BlockConfig, origin: str,
                 origins: dict[str, str]) -> BlockConfig:
    prefix = f"layers[{index}]."
    if not isinstance(spec, Mapping):
        raw.problem(f"layers[{index}]", f"expected a dict of block settings, got "
                    f"{type(spec).__name__}", origin)
        return template
    spec = {str(k): v for k, v in spec.items()
            if v is not None or str(k) not in BLOCK_FIELDS}  # null: the flat setting stays
    missing = [k for k in REQUIRED_LAYER_KEYS if k not in spec]
    if missing:
        raw.problem(f"layers[{index}]", f"missing required key(s) {', '.join(missing)} (each "
                    f"layer must name {', '.join(REQUIRED_LAYER_KEYS)})", origin)
    known = {}
    for key, value in spec.items():
        if key in BLOCK_FIELDS:
            known[key] = (value, origin)
        else:
            raw.problem(prefix + key, "unknown layer key" + did_you_mean(key, BLOCK_FIELDS) +
                        _valid_list(BLOCK_FIELDS), origin)
    values = _coerce_all(raw, known, _TYPES["block"], prefix, origins)
    return dataclasses.replace(template, **values)
