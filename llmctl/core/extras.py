"""Optional dependencies (the `.[hf]` / `.[eval]` extras): imported on first use, and when one
is missing, one line naming the extra to install. Every layer may use it (the data layer's
foreign tokenizers need `tokenizers`; interop needs transformers and lm-eval)."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import LlmctlError

EXTRAS = {"transformers": "hf", "tokenizers": "hf", "lm_eval": "eval"}


def require(module: str) -> ModuleType:
    """Import an optional dependency, or fail with one line naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS.get(module.split(".")[0], "hf")
        raise LlmctlError(f"{module.split('.')[0]} is not installed; install the extra: "
                          f"pip install 'llmctl[{extra}]'") from None
