"""`llmctl export`: a checkpoint as a transformers folder (config.json, model.safetensors,
generation_config.json, tokenizer files).

Native transformers classes where the architecture is exactly theirs (GPT-2, Llama,
DeepSeek-V2/V3), the remote-code `llmctl` type otherwise. The vocabulary is cut to the
tokenizer's size, so the padding rows of a padded vocabulary (50304 > 50257) do not exist in
the export and can never be generated."""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.schema import LLMConfig
from ..core.errors import LlmctlError
from ..core.files import swap_folder
from . import deepseek, gpt2, llama, remote, require
from .adapter import EXACT_FILE, EXACT_PREFIX, Adapter, StateDict

FORMATS = ("auto", "native", "remote")
NATIVE: tuple[Adapter, ...] = (gpt2.ADAPTER, llama.ADAPTER, deepseek.V2, deepseek.V3)
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ExportReport:
    path: Path
    family: str  # gpt2 | llama | deepseek_v2 | deepseek_v3 | llmctl
    architecture: str
    vocab_size: int
    dropped_rows: int  # padding rows of the vocabulary not exported
    not_native: dict[str, list[str]] = field(default_factory=dict)  # family -> why not

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        return d


def native_problems(config: LLMConfig) -> dict[str, list[str]]:
    """Why `config` is not exactly each native family (an empty list: it is)."""
    return {a.name: a.problems(config) for a in NATIVE}


def choose_adapter(config: LLMConfig, fmt: str = "auto") -> tuple[Adapter, dict[str, list[str]]]:
    if fmt not in FORMATS:
        raise LlmctlError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    found = native_problems(config)
    if fmt == "remote":
        return remote.ADAPTER, found
    for adapter in NATIVE:
        if not found[adapter.name]:
            return adapter, found
    if fmt == "native":
        lines = [f"{name}: {'; '.join(why)}" for name, why in found.items()]
        raise LlmctlError("this model is exactly none of the native transformers families "
                          "(use --format remote or auto):\n  " + "\n  ".join(lines))
    return remote.ADAPTER, found


def hf_state_dict(sd: StateDict, config: LLMConfig, adapter: Adapter, vocab: int) -> StateDict:
    """llmctl weights (vocabulary cut to `vocab` rows) under the family's names."""
    sd = dict(sd)
    sd["wte.weight"] = sd["wte.weight"][:vocab]
    sd["lm_head.weight"] = sd["wte.weight"]
    out = adapter.to_hf(sd, config)
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, *, fmt: str = "auto",
                      dtype: str | None = None, force: bool = False) -> ExportReport:
    """Write the transformers folder `out` for checkpoint (or run folder) `ckpt`, atomically."""
    from ..data.tokenizers import tokenizer_from_spec
    from ..runtime.checkpoint import model_shapes, read_checkpoint, read_weights

    require("transformers")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise LlmctlError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, not {dtype!r}")
    info = read_checkpoint(ckpt)
    if not info.tokenizer:
        raise LlmctlError(f"{info.path} records no tokenizer; an export needs one")
    tok = tokenizer_from_spec(info.tokenizer, info.path)
    config = info.run.model
    adapter, why = choose_adapter(config, fmt)
    vocab = tok.vocab_size
    sd = hf_state_dict(read_weights(info.path, model_shapes(config)), config, adapter, vocab)
    exact = {k: sd.pop(k) for k in [k for k in sd if k.startswith(EXACT_PREFIX)]}
    if dtype is not None:
        import torch

        sd = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v
              for k, v in sd.items()}
    final = _target(Path(out), force)
    tmp, old = final.parent / f".{final.name}.tmp", final.parent / f".{final.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _write_folder(tmp, adapter, config, vocab, sd, tok, info, dtype)
        if exact:  # the originals of rounded weights, for a bitwise import (fp32 as trained)
            from safetensors.torch import save_file

            save_file({k[len(EXACT_PREFIX):]: v for k, v in exact.items()},
                      str(tmp / EXACT_FILE), metadata={"format": "pt"})
        shutil.rmtree(old, ignore_errors=True)
        swap_folder(tmp, final, old)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        raise LlmctlError(f"could not write {final}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportReport(final, adapter.name, adapter.architecture, vocab,
                        config.vocab_size - vocab, {k: v for k, v in why.items() if v})


def _target(out: Path, force: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise LlmctlError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LlmctlError(f"{out} exists and is not empty; pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a parent that is a file, a read-only or pseudo file system
        raise LlmctlError(f"cannot create the folder {out.parent}: "
                          f"{err.strerror or err}") from None
    return out.resolve()


def _write_folder(tmp: Path, adapter: Adapter, config: LLMConfig, vocab: int, sd: StateDict,
                  tok: Any, info: Any, dtype: str | None) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig

    from .tokenizer import hf_tokenizer

    fields = adapter.to_hf_config(config, vocab)
    eot = tok.eot_id
    extra = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot,
             "dtype": dtype or "float32",
             # how llmctl reads the folder back exactly (tokenizer kind, source checkpoint)
             "llmctl_tokenizer": dict(info.tokenizer), "llmctl_source_step": info.step}
    if adapter is remote.ADAPTER:
        shutil.copyfile(remote.MODELING_FILE, tmp / remote.MODELING_FILE.name)
        from .modeling_llmctl import LlmctlConfig

        hf_config = LlmctlConfig(**{k: v for k, v in fields.items() if k != "model_type"},
                                 **extra)
    else:
        model_type = fields.pop("model_type")
        hf_config = AutoConfig.for_model(model_type, **fields, **extra)
    hf_config.save_pretrained(tmp)
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
                     do_sample=False).save_pretrained(tmp)
    hf_tokenizer(tok).save_pretrained(tmp)
    tok.save_files(tmp)  # e.g. the tiktoken rank file llmctl_tokenizer names
