"""Datasets: `prepare` (sources -> tokenized, memory-mapped splits) and the training loader.

`llmctl.data.loader` (PreparedDataset, RandomBatchSampler, SequentialBatches) imports torch;
this package itself stays light so `llmctl prepare` starts quickly.
"""

from .tokenizers import Tokenizer, tokenizer_files, tokenizer_from_spec

__all__ = ["Tokenizer", "tokenizer_files", "tokenizer_from_spec"]
