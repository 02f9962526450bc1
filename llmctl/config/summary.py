"""Human-readable description of a resolved config (no torch needed)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .schema import BlockConfig, RunConfig


def attention_label(b: BlockConfig) -> tuple[str, str]:
    """(heads, kv description) for one block."""
    if b.attn == "mla":
        kv = f"q_lat={b.q_latent_dim} kv_lat={b.kv_latent_dim}"
        if b.rope_head_dim:
            kv += f" rope={b.rope_head_dim}"
        return str(b.n_head), kv
    return str(b.n_head), f"kv_heads={b.kv_heads}"


def ffn_label(b: BlockConfig) -> str:
    if not b.moe:
        return f"mlp {b.non_linearity} {b.up_dim}"
    balance = (f"aux-free α={b.alpha} γ={b.gamma}" if b.aux_free else f"aux coeff={b.coeff}")
    return (f"moe {b.n_exp} experts ({b.n_shared} shared, {b.n_act} active) "
            f"{b.non_linearity} {b.up_dim}, {balance}")


T = TypeVar("T")


@dataclass
class Group(Generic[T]):
    """Consecutive equal items `first..last` (inclusive), shown once."""

    first: int
    last: int
    item: T

    @property
    def span(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"

    @property
    def block(self) -> T:
        return self.item


def consecutive_groups(items: Sequence[T], key: Callable[[T], Any] = lambda item: item
                       ) -> list[Group[T]]:
    """Runs of consecutive items with equal `key` merged, so a homogeneous model is one row."""
    groups: list[Group[T]] = []
    for i, item in enumerate(items):
        if groups and key(groups[-1].item) == key(item):
            groups[-1].last = i
        else:
            groups.append(Group(i, i, item))
    return groups


def layer_groups(run: RunConfig) -> list[Group[BlockConfig]]:
    """The model's layers, consecutive equal ones merged."""
    return consecutive_groups(run.model.layers)


def training_summary(run: RunConfig, world_size: int = 1) -> dict[str, object]:
    t = run.train
    micro = run.tokens_per_micro_step(world_size)
    return {
        "dataset": f"{t.data_dir}/{t.dataset}",
        "tokens per step": t.total_batch_size,
        "micro-batch": f"{t.batch_size} × {run.model.block_size} tokens"
                       + (f" × {world_size} ranks" if world_size > 1 else ""),
        "grad accumulation steps": (run.grad_accum_steps(world_size)
                                    if t.total_batch_size % micro == 0 else "not an integer"),
        "steps": t.max_iters,
        "learning rate": f"{t.learning_rate:g} → {t.final_lr:g} (warmup {t.warmup_steps}, "
                         "cosine)",
        "run folder": f"{t.out_dir}/{t.file_name}",
    }
