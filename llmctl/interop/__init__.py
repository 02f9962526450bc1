"""Interchange with the Hugging Face ecosystem: export to / import from transformers folders
(one adapter module per model family) and benchmark evaluation through lm-eval.

transformers and lm-eval are optional extras (`.[hf]`, `.[eval]`); `require` names the
extra when one is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..core.errors import LlmctlError

EXTRAS = {"transformers": "hf", "tokenizers": "hf", "lm_eval": "eval"}


def require(module: str) -> ModuleType:
    """Import an optional dependency, or fail with one line naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS.get(module.split(".")[0], "hf")
        raise LlmctlError(f"{module.split('.')[0]} is not installed; install the extra: "
                          f"pip install 'llmctl[{extra}]'") from None
