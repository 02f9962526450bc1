"""Interchange with the Hugging Face ecosystem: export to / import from transformers folders
(one adapter module per model family) and benchmark evaluation through lm-eval.

transformers and lm-eval are optional extras (`.[hf]`, `.[eval]`); `require` (core.extras)
names the extra when one is missing."""

from __future__ import annotations

from ..core.extras import EXTRAS, require

__all__ = ["EXTRAS", "require"]
