"""Import a local transformers folder (GPT-2, Llama, DeepSeek-V2/V3, or an llmctl export) as
an llmctl config, state dict and tokenizer; refuse what llmctl's architecture space lacks.

`load_hf(path)` is the library entry point (for `train --init_from hf:PATH`);
`load_hf_checkpoint` gives `sample` / `eval` the same LoadedCheckpoint a checkpoint gives."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.loader import load_config
from ..config.schema import LLMConfig, RunConfig
from ..config.validate import MAX_LAYERS
from ..core.errors import ConfigError, LlmctlError
from ..core.files import CHECKPOINT_JSON_LIMIT, read_user_file
from . import deepseek, gpt2, llama, remote
from .adapter import EXACT_FILE, EXACT_PREFIX, Adapter, ImportRefused, StateDict

PREFIX = "hf:"
# config.json keys that count layers, in the families' configs
LAYER_COUNT_KEYS = ("n_layer", "num_hidden_layers", "first_k_dense_replace")
ADAPTERS: dict[str, Adapter] = {"gpt2": gpt2.ADAPTER, "llama": llama.ADAPTER,
                                "deepseek_v2": deepseek.V2, "deepseek_v3": deepseek.V3,
                                "llmctl": remote.ADAPTER}


@dataclass
class HFModel:
    path: Path
    family: str
    run: RunConfig  # model = the llmctl config; train = defaults
    state_dict: StateDict  # llmctl names, ready for LLM(run.model).load_state_dict
    tokenizer_spec: dict[str, Any]  # llmctl's spec (kind hf: a foreign tokenizer.json)
    tokenizer: Any  # an llmctl Tokenizer (interop.tokenizer.TransformersTokenizer: no json)
    step: int = 0

    @property
    def config(self) -> LLMConfig:
        return self.run.model


def is_hf_path(path: str | os.PathLike) -> bool:
    return str(path).startswith(PREFIX)


def hf_folder(path: str | os.PathLike) -> Path:
    folder = Path(str(path).removeprefix(PREFIX)).expanduser()
    if not (folder / "config.json").exists():  # a FIFO or device there: the reader says so
        raise LlmctlError(f"{folder} is not a transformers folder (no config.json); hf:PATH "
                          "takes a local folder (download Hub models first)")
    return folder


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a file of a transformers folder, read with a bound (regular files
    only); anything else is an LlmctlError naming the file."""
    text = read_user_file(path, what, CHECKPOINT_JSON_LIMIT)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise LlmctlError(f"{what} {path} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise LlmctlError(f"{what} {path} is not a JSON object")
    return value


def _shard_files(index: Path) -> list[str]:
    """The shard files a model.safetensors.index.json names: file names inside its folder."""
    weight_map = read_json_object(index, "weight index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise LlmctlError(f"{index} has no weight_map object (tensor name -> shard file)")
    files = set(weight_map.values())
    bad = sorted(repr(f) for f in files if not isinstance(f, str) or Path(f).name != f
                 or f in ("", ".", ".."))
    if bad:
        raise LlmctlError(f"{index}: a shard must be a file name in its folder, not "
                          f"{', '.join(bad[:3])}")
    return sorted(files)


def read_hf_weights(folder: Path, max_numbers: int | None = None) -> StateDict:
    """model.safetensors, or the shards its index names; pickled weights are refused. Every
    file's header is read first: each must be a regular safetensors file, and together they
    may hold at most `max_numbers` numbers (checked before any tensor is read)."""
    from safetensors import SafetensorError, safe_open

    from ..runtime.weights_header import read_header, stored_numbers

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = _shard_files(index)
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = (f" ({', '.join(pickled)} is a pickle, which llmctl never loads; convert it "
                "with transformers: model.save_pretrained(out, safe_serialization=True))"
                if pickled else "")
        raise LlmctlError(f"{folder} has no model.safetensors{hint}")
    exact = [EXACT_FILE] if (folder / EXACT_FILE).is_file() else []
    numbers = sum(stored_numbers(read_header(folder / name)[0]) for name in files)
    if max_numbers is not None and numbers > max_numbers:
        raise LlmctlError(f"the weights of {folder} hold {numbers:,} numbers, more than the "
                          f"model its config.json describes can use ({max_numbers:,})")
    sd: StateDict = {}
    for name in files + exact:
        prefix = EXACT_PREFIX if name == EXACT_FILE else ""
        try:
            with safe_open(str(folder / name), framework="pt", device="cpu") as f:
                sd |= {prefix + k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as err:
            raise LlmctlError(f"{folder / name} is unreadable: {err}") from None
    return sd


def _tokenizer(folder: Path, hf: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    from ..data.hf_tokenizer import HF_FILE, hf_tokenizer_from_path
    from ..data.tokenizers import tokenizer_from_spec

    spec = hf.get("llmctl_tokenizer")
    if isinstance(spec, dict):  # exported by llmctl: the exact tokenizer it trained with
        return dict(spec), tokenizer_from_spec(spec, folder)
    if (folder / HF_FILE).is_file():  # a foreign fast tokenizer: data can be prepared with it
        tok = hf_tokenizer_from_path(folder)
        return tok.spec, tok
    from .tokenizer import TransformersTokenizer

    tok = TransformersTokenizer(folder)
    return tok.spec, tok


def load_hf(path: str | os.PathLike) -> HFModel:
    """The llmctl model of a transformers folder: (config, state dict, tokenizer)."""
    folder = hf_folder(path)
    hf = read_json_object(folder / "config.json", "transformers config")
    kind = hf.get("model_type")
    adapter = ADAPTERS.get(kind) if isinstance(kind, str) else None
    if adapter is None:
        raise ImportRefused(f"{folder}: model type {kind!r} is not in llmctl's architecture "
                            f"space (importable: {', '.join(ADAPTERS)})")
    step = hf.get("llmctl_source_step", 0)
    if type(step) is not int or step < 0:
        raise LlmctlError(f"{folder}/config.json: llmctl_source_step must be a whole number "
                          f">= 0, got {step!r}")
    # the adapters build one block per layer: counts are checked before any is built
    bad = [f"{key}={hf[key]!r}" for key in LAYER_COUNT_KEYS if key in hf and (
        type(hf[key]) is not int or not 0 <= hf[key] <= MAX_LAYERS)]
    if bad:
        raise ImportRefused(f"{folder}/config.json: {', '.join(bad)} (a layer count is a whole "
                            f"number from 0 to {MAX_LAYERS:,})")
    try:
        config = adapter.from_hf_config(hf)
    except KeyError as err:
        raise ImportRefused(f"{folder}/config.json: this {kind} config has no {err} "
                            "field") from None
    except (TypeError, ValueError, AttributeError, OverflowError) as err:
        # a field of the wrong kind (a string where a number belongs, a list for a mapping)
        raise ImportRefused(f"{folder}/config.json: a field of this {kind} config has the "
                            f"wrong type or value ({type(err).__name__}: {err})") from None
    model = dataclasses.asdict(config)
    layers = model.pop("layers")
    try:
        run = load_config({"model": model, "layers": layers}, check_batch_split=False)
    except ConfigError as err:
        raise ImportRefused(f"{folder}: the translated config is invalid:\n{err}") from None
    from ..model.costs import parameter_counts

    # an untied head or a buffer may come beside the model's own numbers, not much more
    wanted = parameter_counts(run.model)["total"]
    raw = read_hf_weights(folder, max_numbers=2 * wanted + (1 << 20))
    embed = next((k for k in ("model.embed_tokens.weight", "transformer.wte.weight")
                  if k in raw), None)
    head = raw.get("lm_head.weight")
    if head is not None and embed is not None and not head.equal(raw[embed]):
        raise ImportRefused(f"{folder}: lm_head differs from the input embedding (llmctl ties "
                            "them)")
    try:
        sd = adapter.from_hf(raw, run.model, hf)
    except KeyError as err:
        raise LlmctlError(f"{folder}: weight {err} is missing for a {kind} model") from None
    except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as err:
        # a weight of the wrong rank or dtype that the adapter's reshapes cannot take
        raise LlmctlError(f"{folder}: the weights do not fit a {kind} model of this config "
                          f"({type(err).__name__}: {str(err)[:200]})") from None
    _check_fits(sd, run.model, folder)
    spec, tok = _tokenizer(folder, hf)
    if tok.vocab_size > run.model.vocab_size:
        raise LlmctlError(f"{folder}: the tokenizer has {tok.vocab_size} tokens, the model "
                          f"only {run.model.vocab_size}")
    return HFModel(folder, adapter.name, run, sd, spec, tok, step)


def _check_fits(sd: StateDict, config: LLMConfig, folder: Path) -> None:
    import torch

    from ..model import LLM

    with torch.device("meta"):
        expected = LLM(config).state_dict()
    problems = [f"missing {k}" for k in expected if k not in sd]
    problems += [f"{k}: {tuple(sd[k].shape)} where llmctl needs {tuple(v.shape)}"
                 for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if problems:
        raise LlmctlError(f"{folder}: weights do not fit the translated config:\n  "
                          + "\n  ".join(problems[:10]))
    for k in list(sd):
        if k not in expected:
            del sd[k]  # e.g. transformers' non-persistent rotary tables saved by old versions
        else:
            sd[k] = sd[k].to(expected[k].dtype)


def load_hf_checkpoint(path: str | os.PathLike, device: str = "auto", dtype: str = "auto"):
    """`hf:PATH` as a LoadedCheckpoint (eval mode, on the device) for sample and eval."""
    from ..infer.load import LoadedCheckpoint
    from ..model import LLM
    from ..runtime.checkpoint import CheckpointInfo
    from ..runtime.device import precision_for

    precision = precision_for(device, dtype)
    imported = load_hf(path)
    model = LLM(imported.config)
    model.load_state_dict(imported.state_dict, strict=True)
    model.to(precision.device).eval()
    info = CheckpointInfo(path=imported.path, run=imported.run, step=imported.step,
                          tokenizer=imported.tokenizer_spec,
                          raw={"hf_family": imported.family})
    return LoadedCheckpoint(model=model, info=info, tokenizer=imported.tokenizer,
                            precision=precision)
