"""The model: `LLM(config)` builds every layer from `config.layers`."""

from .cache import KVCache, LayerCache
from .transformer import LLM, Block, ModelOutput

__all__ = ["LLM", "Block", "KVCache", "LayerCache", "ModelOutput"]
