"""The decoder-only language model: embeddings, a stack of pre-norm blocks, an LM head (tied
to the embedding unless tie_embeddings is false)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config.schema import BlockConfig, LLMConfig
from .attention import build_attention
from .cache import KVCache, LayerCache
from .mlp import MLP
from .moe import MoE
from .mtp import MTPModule
from .norm import make_norm
from .positional import Positions, sinusoidal
from .recompute import checkpointed


def soft_cap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap): smooth, monotone, bounded by +-cap."""
    return cap * torch.tanh(logits / cap)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V), or (B, 1, V) with last_logits_only
    loss: torch.Tensor | None  # lm_loss + aux_loss; None without targets
    aux_loss: torch.Tensor  # 0-dim: sum of the MoE balancing terms (0 without MoE / in eval)
    kv_cache: KVCache | None  # the updated cache (prefill / decode), None in training
    lm_loss: torch.Tensor | None = None  # cross-entropy alone
    mtp_losses: list[torch.Tensor] | None = None  # cross-entropy of each MTP depth (training)
    hidden: torch.Tensor | None = None  # (B, T, C) last block output, with return_hidden


def _mlp(block: BlockConfig, *, n_embd: int, dropout: float, moe_dispatch: str) -> nn.Module:
    return MLP(n_embd, block.up_dim, block.non_linearity, dropout)


def _moe(block: BlockConfig, *, n_embd: int, dropout: float, moe_dispatch: str) -> nn.Module:
    return MoE(block, n_embd, dropout, dispatch=moe_dispatch)


# the feed-forward kinds (BlockConfig.ffn_kind) and how each is built
FFN_CLASSES = {"mlp": _mlp, "moe": _moe}


def build_ffn(block: BlockConfig, *, n_embd: int, dropout: float,
              moe_dispatch: str = "auto") -> nn.Module:
    return FFN_CLASSES[block.ffn_kind](block, n_embd=n_embd, dropout=dropout,
                                       moe_dispatch=moe_dispatch)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, block: BlockConfig, *, n_embd: int, dropout: float, pos_emb: str,
                 norm: str, moe_dispatch: str = "auto"):
        super().__init__()
        self.attn_norm = make_norm(norm, n_embd)
        self.attn = build_attention(block, n_embd=n_embd, dropout=dropout, pos_emb=pos_emb,
                                    norm=norm)
        self.ffn_norm = make_norm(norm, n_embd)
        self.ffn = build_ffn(block, n_embd=n_embd, dropout=dropout, moe_dispatch=moe_dispatch)

    def forward(self, x: torch.Tensor, pos: Positions,
                cache: LayerCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.attn(self.attn_norm(x), pos, cache)  # (B, T, C)
        if isinstance(self.ffn, MoE):
            h, aux = self.ffn(self.ffn_norm(x))
            return x + h, aux
        return x + self.ffn(self.ffn_norm(x)), None


class LLM(nn.Module):
    """The model of `config`. `act_recomp` recomputes each block's activations in backward
    (training only); `moe_dispatch` picks the expert matmul (auto | grouped_mm | loop)."""

    def __init__(self, config: LLMConfig, *, act_recomp: bool = False,
                 moe_dispatch: str = "auto"):
        super().__init__()
        self.config = config
        self.act_recomp = act_recomp
        C = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, C)
        self.wpe = nn.Embedding(config.block_size, C) if config.pos_emb == "learn" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(layer, n_embd=C, dropout=config.dropout, pos_emb=config.pos_emb,
                  norm=config.norm, moe_dispatch=moe_dispatch)
            for layer in config.layers)
        self.norm_f = make_norm(config.norm, C)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self._init_weights()
        # Built and initialised after the main model, so that its parameter names and random
        # draws are exactly those of a model without MTP (mtp_depth 0 is today's model).
        self.mtp = nn.ModuleList(
            MTPModule(Block(config.layers[-1], n_embd=C, dropout=config.dropout,
                            pos_emb=config.pos_emb, norm=config.norm, moe_dispatch=moe_dispatch),
                      n_embd=C, norm=config.norm)
            for _ in range(config.mtp_depth))
        self._init_weights(self.mtp)

    def _init_weights(self, module: nn.Module | None = None) -> None:
        """GPT-2 init of `module` (default: the whole model): N(0, std); residual output
        projections N(0, std / sqrt(2 n_layer))."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * len(self.blocks))
        for param in (self if module is None else module).parameters():
            if param.dim() < 2:
                continue  # norms keep their ones / zeros
            nn.init.normal_(param, 0.0, residual_std if getattr(param, "residual_out", False)
                            else std)
        if self.config.zero_init_proj:  # every block starts as the identity map
            for param in self.parameters():
                if getattr(param, "residual_out", False):
                    nn.init.zeros_(param)
            if not self.config.tie_embeddings:
                nn.init.zeros_(self.lm_head.weight)

    @property
    def moe_layers(self) -> list[MoE]:
        blocks = [*self.blocks, *(module.block for module in self.mtp)]
        return [block.ffn for block in blocks if isinstance(block.ffn, MoE)]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, *, use_cache: bool | None = None,
                last_logits_only: bool = False, return_hidden: bool = False) -> ModelOutput:
        """idx (B, T) token ids. With targets (B, T; -1 = ignore): training, logits for every
        position, no cache. Without: prefill / decode step continuing `kv_cache` (mutated in
        place and returned; a new one is started when None unless use_cache=False).
        return_hidden keeps the last block's output before the final norm (what the MTP
        modules read) in `out.hidden`."""
        B, T = idx.shape
        if use_cache is None:
            use_cache = targets is None or kv_cache is not None
        if kv_cache is not None and not use_cache:
            raise ValueError("kv_cache given with use_cache=False")
        if use_cache and kv_cache is None:
            kv_cache = KVCache(len(self.blocks), capacity=self.config.block_size)
        start = kv_cache.length if use_cache else 0
        if start + T > self.config.block_size:
            raise ValueError(f"{start} cached + {T} new tokens exceed block_size "
                             f"{self.config.block_size}; crop the context")
        pos = Positions(start, T, idx.device, self.config.rope_theta)
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(pos.ids)
        elif self.config.pos_emb == "sin":
            x = x + sinusoidal(pos.ids, self.config.n_embd).to(x.dtype)
        x = self.drop(x)
        aux_loss = torch.zeros((), device=idx.device)
        recompute = self.act_recomp and self.training and torch.is_grad_enabled() and not use_cache
        for i, block in enumerate(self.blocks):
            if recompute:
                x, aux = checkpointed(block, x, pos)
            else:
                x, aux = block(x, pos, kv_cache.layers[i] if use_cache else None)
            if aux is not None:
                aux_loss = aux_loss + aux
        mtp_losses = None
        if targets is not None and len(self.mtp):
            mtp_losses, mtp_aux = self._mtp_losses(x, idx, targets, recompute)
            aux_loss = aux_loss + mtp_aux
        hidden = x if return_hidden else None  # (B, T, C)
        x = self.norm_f(x)
        if last_logits_only:
            x = x[:, -1:]  # (B, 1, C)
        logits = self.lm_head(x)  # (B, T, V)
        if self.config.logit_softcap:
            logits = soft_cap(logits, self.config.logit_softcap)
        lm_loss = loss = None
        if targets is not None:
            lm_loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                      ignore_index=-1)
            loss = lm_loss + aux_loss
            if mtp_losses:
                loss = loss + self.config.mtp_weight * torch.stack(mtp_losses).mean()
        return ModelOutput(logits, loss, aux_loss, kv_cache if use_cache else None, lm_loss,
                           mtp_losses, hidden)

    def _mtp_losses(self, hidden: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor,
                    recompute: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Cross-entropy of each MTP depth k on the T - k positions that have a target k
        tokens further on, and the MoE aux terms of the modules' blocks."""
        T = idx.size(1)
        losses: list[torch.Tensor] = []
        aux_loss = torch.zeros((), device=idx.device)
        for k, module in enumerate(self.mtp, start=1):
            if T - k < 1:
                break
            pos = Positions(0, T - k, idx.device, self.config.rope_theta)
            embedded = self.wte(idx[:, k:])  # (B, T - k, C): tokens i + k
            args = (hidden[:, : T - k], embedded, pos)
            hidden, aux = checkpointed(module, *args) if recompute else module(*args)
            if aux is not None:
                aux_loss = aux_loss + aux
            logits = self.lm_head(module.norm_f(hidden))  # (B, T - k, V)
            losses.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                          targets[:, k:].reshape(-1), ignore_index=-1))
        return losses, aux_loss

    # ------------------------------------------------------------ MoE load balancing

    def moe_load_counts(self) -> list[torch.Tensor]:
        """Tokens routed to each routed expert per MoE layer since the last update."""
        return [layer.load_counts() for layer in self.moe_layers]

    def update_expert_biases(self, counts: list[torch.Tensor]) -> None:
        """Aux-free bias step from (all-reduced) counts; resets every layer's counters."""
        layers = self.moe_layers
        if len(counts) != len(layers):
            raise ValueError(f"expected {len(layers)} count tensors, got {len(counts)}")
        for layer, load in zip(layers, counts, strict=True):
            layer.update_bias(load)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:  # an untied head counts with them (its matmul: the V*C FLOPs)
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe else 0)
            if self.lm_head.weight is not self.wte.weight:
                n -= self.lm_head.weight.numel()
        return n
