"""The trainer's view of a prepared dataset: checked once, then samplers per split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..data.loader import PreparedDataset, RandomBatchSampler
from ..runtime.distributed import DistEnv


@dataclass
class TrainingData:
    dataset: PreparedDataset
    batch_size: int
    block_size: int
    env: DistEnv

    def sampler(self, split: str, seed: int) -> RandomBatchSampler:
        """Random windows of `split`; every rank takes its rows of the same global batch."""
        return self.dataset.random_batches(split, self.batch_size, self.block_size, seed,
                                           rank=self.env.rank, world_size=self.env.world_size)

    @property
    def tokenizer_spec(self) -> dict[str, Any]:
        return self.dataset.tokenizer_spec

    @property
    def tokenizer_files(self) -> list[Path]:
        return self.dataset.tokenizer_files()


def open_training_data(run: RunConfig, env: DistEnv) -> TrainingData:
    """Open data_dir/dataset and refuse it early: missing, too short, ids beyond vocab_size."""
    cfg = run.train
    dataset = PreparedDataset.open(cfg.data_dir, cfg.dataset)
    dataset.check_vocab(run.model.vocab_size)
    data = TrainingData(dataset, cfg.batch_size, run.model.block_size, env)
    for split in ("train", "val") if cfg.eval else ("train",):
        data.sampler(split, seed=cfg.seed)  # names the split if it is missing or too short
    return data
