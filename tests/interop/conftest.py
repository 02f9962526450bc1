"""Tiny llmctl checkpoints (a few thousand parameters) with a char tokenizer, for interop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

CHARS = "".join(sorted("\n !',.?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"))
BASE = {"attn": "mha", "n_layer": 2, "n_embd": 32, "block_size": 32, "n_head": 4,
        "up_dim": 48,
        "vocab_size": len(CHARS) + 1, "dropout": 0.0}


def make_checkpoint(folder: Path, overrides: dict, *, seed: int = 0, vocab_pad: int = 0,
                    perturb: bool = True) -> Path:
    """Save a random llmctl model of BASE + overrides; norms and MoE biases are perturbed so
    a mapping that drops or swaps them shows in the logits."""
    from llmctl.config import load_config
    from llmctl.data.tokenizers import CharTokenizer
    from llmctl.model import LLM
    from llmctl.runtime.checkpoint import save_checkpoint

    tok = CharTokenizer(CHARS)
    options = {**BASE, "vocab_size": tok.vocab_size + vocab_pad, **overrides}
    run = load_config(overrides=options, check_batch_split=False)
    torch.manual_seed(seed)
    model = LLM(run.model)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() == 1 and perturb:  # norm weights / biases
                p.add_(0.1 * torch.randn_like(p))
            elif p.dim() >= 2:  # larger than GPT-2 init so errors are visible
                p.normal_(0, 0.2)
        for buf_name, buf in model.named_buffers():
            if buf_name.endswith("expert_bias"):
                buf.copy_(0.05 * torch.randn_like(buf))
    return save_checkpoint(folder, state_dict=model.state_dict(), run=run, step=7,
                           tokenizer=tok.spec)


@pytest.fixture
def checkpoint(tmp_path: Path):
    def make(overrides: dict, **kw) -> Path:
        return make_checkpoint(tmp_path / "ckpt", overrides, **kw)

    return make
