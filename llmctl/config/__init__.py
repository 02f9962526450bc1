"""Configuration: the dataclass tree and the one loader every command uses."""

from ..core.errors import ConfigError, Problem
from .loader import load_config
from .schema import BlockConfig, LLMConfig, LLMconfig, RunConfig, TrainConfig, Trainconfig

__all__ = [
    "BlockConfig", "ConfigError", "LLMConfig", "LLMconfig", "Problem", "RunConfig",
    "TrainConfig", "Trainconfig", "load_config",
]
