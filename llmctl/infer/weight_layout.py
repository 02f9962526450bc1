"""Which weights a decoding step reads in which layout, on a CPU.

At batch 1 a projection is a matrix-vector product, bound by how fast its weight streams
from memory. MKL streams an (in, out) contiguous copy of a weight 1.2-1.6x faster where the
output is at least as wide as the input, while a wider input streams faster in the weight's
own (out, in) rows: up projections get a copy, made once per decoder, down projections stay
as they are; no copies when they would take more than a quarter of the free memory (then
the step reads transposed views of the model's weights).
"""

from __future__ import annotations

import torch

from ..model.attention import CausalSelfAttention
from ..model.mlp import MLP
from ..model.transformer import LLM
from ..runtime.device import available_memory

# column-major copies only while they take at most this share of the free memory
LAYOUT_MEMORY_SHARE = 0.25


def projection_weights(model: LLM, head: bool = True) -> list[torch.Tensor]:
    """The 2-D weights the decoding step multiplies by as they are (not the embedding tables;
    not MLA's down projections, which it joins into one matrix; the head's where `head`)."""
    weights = [model.lm_head.weight] if head else []
    for block in model.blocks:
        attn, ffn = block.attn, block.ffn
        if type(attn) is CausalSelfAttention:
            weights += [attn.qkv.weight, attn.proj.weight]
        else:
            weights += [attn.q_up.weight, attn.proj.weight]
        if type(ffn) is MLP:
            weights += [ffn.up.weight, ffn.down.weight]
    return weights


def copy_pays(shape: tuple[int, int]) -> bool:
    """Whether an (out, in) weight streams faster from an (in, out) copy at batch 1: where
    out >= in (1.2-1.6x at 256 -> 1024 and 768 -> 3072 on a Zen 3 core, even at 768 -> 768);
    a wider input is read faster in the weight's own rows (1.1-1.5x at 1024 -> 256 and
    3072 -> 768)."""
    out_features, in_features = shape
    return out_features >= in_features


def owns_copies(model: LLM) -> bool:
    """Whether the step copies projection weights into (in, out) layout (those where
    `copy_pays`): on a CPU with fp32 / fp64 weights, when the copies fit in a quarter of the
    free memory."""
    weights = projection_weights(model)
    if not all(w.device.type == "cpu" and w.dtype in (torch.float32, torch.float64)
               for w in weights):
        return False
    need = sum(w.numel() * w.element_size() for w in weights if copy_pays(w.shape))
    free, _ = available_memory(weights[0].device)
    return free is None or need <= LAYOUT_MEMORY_SHARE * free


def transposed_weights(model: LLM, copy: bool | None = None,
                       head: bool = True) -> dict[int, torch.Tensor]:
    """{id(weight): weight^T as an (in, out) tensor} for every projection of the step (the
    head's too where `head`): a contiguous copy when `copy` (default: `owns_copies(model)`)
    and `copy_pays`, else the transposed view."""
    if copy is None:
        copy = owns_copies(model)
    return {id(w): transposed(w, copy) for w in projection_weights(model, head)}


def copied(shape: tuple[int, int], copy: bool) -> bool:
    """Whether the step reads an (out, in) weight of this shape from its own (in, out) copy:
    where copies are made (`copy`) and `copy_pays`."""
    return copy and copy_pays(shape)


def transposed(weight: torch.Tensor, copy: bool) -> torch.Tensor:
    """weight^T: an (in, out) contiguous copy where `copied`, else the transposed view."""
    if copied(weight.shape, copy):
        return weight.detach().t().contiguous()
    return weight.detach().t()
