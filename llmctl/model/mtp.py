"""Multi-token prediction modules (DeepSeek-V3).

Module k (1..D) predicts the token k + 1 positions ahead: at position i it combines the
previous module's hidden state h^{k-1}_i (h^0 = the main model's last block output, before
its final norm) with the embedding of token i + k,
    h^k_i = Block_k(W_k [norm(h^{k-1}_i); norm(emb(t_{i+k}))]),
and the shared LM head reads norm_k(h^k_i). The embedding and the head are the main model's;
each module owns its projection W_k, its norms and one transformer block (configured like the
model's last layer). The modules see T - k positions of a length-T training window.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import LayerCache
from .norm import make_norm
from .positional import Positions


class MTPModule(nn.Module):
    def __init__(self, block: nn.Module, *, n_embd: int, norm: str):
        super().__init__()
        self.hidden_norm = make_norm(norm, n_embd)
        self.embed_norm = make_norm(norm, n_embd)
        self.proj = nn.Linear(2 * n_embd, n_embd, bias=False)
        self.block = block
        self.norm_f = make_norm(norm, n_embd)

    def forward(self, hidden: torch.Tensor, embedded: torch.Tensor, pos: Positions,
                cache: LayerCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden, embedded (B, T, C) -> (the module's hidden state (B, T, C), MoE aux or None)."""
        x = self.proj(torch.cat((self.hidden_norm(hidden), self.embed_norm(embedded)), dim=-1))
        return self.block(x, pos, cache)  # (B, T, C)
