"""`--init_from`: which weights a new run starts from, the config it runs with, and how its
vocabulary relates to the source's. One place, so new source kinds (`hf:PATH`) slot in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig, load_config
from ..core.errors import LlmctlError
from ..data.loader import PreparedDataset
from ..data.tokenizers import describe_spec, tokenizer_extension
from ..runtime.base_weights import weights_sha256
from ..runtime.checkpoint import CheckpointError, CheckpointInfo, read_checkpoint
from .architecture import architecture_differences

HF_PREFIX = "hf:"


@dataclass
class InitSource:
    path: Path  # the checkpoint folder
    info: CheckpointInfo
    sha256: str  # of its weights file

    def record(self) -> dict[str, Any]:
        """What the new run's config.json says about where it started."""
        return {"path": str(self.path.resolve()), "sha256": self.sha256, "step": self.info.step}


def read_init_source(spec: str) -> InitSource:
    """The checkpoint `--init_from` names (a checkpoint, or a run folder: best, else latest)."""
    if spec.startswith(HF_PREFIX):
        raise LlmctlError(f"--init_from {spec}: a Hugging Face folder is imported by the "
                          "llmctl command line (`llmctl train --init_from hf:PATH`, also with "
                          "--nproc or under torchrun); from Python, import it first "
                          "(llmctl.interop.hf_init.checkpoint_from_hf) and pass that folder")
    try:
        info = read_checkpoint(Path(spec).expanduser())
    except CheckpointError as err:
        raise CheckpointError(f"--init_from {spec}: {err}") from None
    if info.raw.get("adapter"):
        raise LlmctlError(f"--init_from {spec}: {info.path} is a LoRA adapter checkpoint; "
                          f"merge it first (llmctl merge-lora {info.path} OUT) and start from OUT")
    return InitSource(info.path, info, weights_sha256(info.path))


def new_token_rows(source: dict[str, Any] | None, dataset: PreparedDataset,
                   origin: str) -> tuple[int, int] | None:
    """Token ids [lo, hi) the dataset's tokenizer adds to the source's; None when equal.

    The dataset must use the source's tokenizer, or that tokenizer plus special tokens."""
    ours = dataset.tokenizer_spec
    if not source:
        raise LlmctlError(f"{origin} records no tokenizer, so dataset {dataset.name} cannot "
                          "be checked against it")
    added = tokenizer_extension(source, ours)
    if added is None:
        raise LlmctlError(
            f"dataset {dataset.name} was tokenized with {describe_spec(ours)}, but {origin} "
            f"with {describe_spec(source)}: the token ids would mean different text; prepare "
            f"the data with `--tokenizer_from {origin}`")
    if not added:
        return None
    return dataset.vocab_size - len(added), dataset.vocab_size


def init_run_config(config_files: list[Path], overrides: dict[str, Any],
                    world_size: int | None, source: InitSource) -> RunConfig:
    """The run's config: the source's architecture, then files and flags (training keys and
    dropout may change; a flag that changes a shape is refused with every difference). The
    vocabulary grows when the dataset adds special tokens."""
    saved = source.info.raw["config"]
    layers = saved["layers"]
    if layers and all(layer == layers[0] for layer in layers):
        # homogeneous: flat keys, so a block flag (--up_dim) meets the checkpoint's value
        # and is reported as a difference instead of losing to a layer list
        base = {k: v for k, v in {**saved["model"], **layers[0]}.items() if v is not None}
    else:
        base = {"model": saved["model"], "layers": layers}
    try:
        run = load_config(base, *config_files, overrides=overrides, world_size=world_size)
    except ConfigError as err:
        raise LlmctlError(f"--init_from {source.path}: the architecture comes from the "
                          f"checkpoint ({len(source.info.run.model.layers)} layers), and these "
                          f"settings do not fit it:\n{err}") from None
    dataset = PreparedDataset.open(run.train.data_dir, run.train.dataset)
    rows = new_token_rows(source.info.tokenizer, dataset, str(source.path))
    old_vocab = source.info.run.model.vocab_size
    needed = max(dataset.vocab_size, dataset.max_token_id + 1)
    if rows is not None and run.model.vocab_size < needed:
        run.model.vocab_size = needed  # grow: the new special tokens get rows
    diffs = architecture_differences(source.info.run.model, run.model)
    if run.model.vocab_size > old_vocab and rows is not None:
        diffs = [d for d in diffs if not d.startswith("vocab_size:")]
    if diffs:
        raise LlmctlError(f"--init_from {source.path}: these settings would change the shape "
                          "of the model it holds:\n  " + "\n  ".join(diffs)
                          + "\ndrop them (the architecture comes from the checkpoint); dropout "
                          "and every training setting may change")
    return run
