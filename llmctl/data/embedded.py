"""Tiny Shakespeare and GPT-2's BPE ranks, shipped xz-compressed inside the package.

With them `llmctl prepare shakespeare` (any tokenizer) and every use of the `gpt2` tokenizer
work on a machine without network access. The files are byte-identical to the originals:
Tiny Shakespeare from karpathy/char-rnn (1,115,394 characters) and tiktoken's
`r50k_base.tiktoken` (GPT-2's ranks, sha256 306cd27f...).
"""

from __future__ import annotations

import functools
import lzma
from importlib import resources

from ..core.errors import LlmctlError

SHAKESPEARE_ASSET = "tinyshakespeare.txt.xz"
GPT2_RANKS_ASSET = "gpt2.tiktoken.xz"
SHAKESPEARE_SOURCE = "embedded:tinyshakespeare.txt"  # recorded in meta.json options
SHAKESPEARE_DESCRIPTION = "Tiny Shakespeare (karpathy/char-rnn; embedded in llmctl)"


@functools.lru_cache(maxsize=2)
def _asset(name: str) -> bytes:
    try:
        packed = (resources.files(__package__) / "assets" / name).read_bytes()
        return lzma.decompress(packed)
    except (OSError, lzma.LZMAError) as err:
        raise LlmctlError(f"llmctl's embedded {name} is missing or damaged ({err}); reinstall "
                          "llmctl") from None


def shakespeare_bytes() -> bytes:
    """Tiny Shakespeare as UTF-8 bytes, exactly as karpathy/char-rnn serves it."""
    return _asset(SHAKESPEARE_ASSET)


def gpt2_rank_bytes() -> bytes:
    """GPT-2's BPE ranks in tiktoken's .tiktoken format (`base64-token rank` lines)."""
    return _asset(GPT2_RANKS_ASSET)
