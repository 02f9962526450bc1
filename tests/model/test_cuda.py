"""CUDA under bf16 autocast (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from llmctl.model import LLM

pytestmark = pytest.mark.gpu
ATTNS = ["mha", "mqa", "gqa", "mla"]


@pytest.mark.parametrize("attn", ATTNS)
def test_bf16_training_step_is_finite_and_counts_loads(make_config, aux_free_flags,
                                                       attn: str) -> None:
    model = LLM(make_config(attn=attn, pos_emb="rope", **aux_free_flags)).cuda()
    idx = torch.randint(0, 61, (2, 20), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(idx, targets=idx)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    counts = model.moe_load_counts()
    assert all(c.device.type == "cuda" and c.sum() == 2 * 20 * 2 for c in counts)
    model.update_expert_biases(counts)


@pytest.mark.parametrize("attn", ATTNS)
def test_bf16_cached_decoding_tracks_the_full_forward(make_config, attn: str) -> None:
    model = LLM(make_config(attn=attn, pos_emb="rope")).cuda().eval()
    idx = torch.randint(0, 61, (2, 20), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        full = model(idx, use_cache=False).logits.float()
        out = model(idx[:, :8])
        pieces = [out.logits.float()]
        for t in range(8, 20):
            out = model(idx[:, t:t + 1], kv_cache=out.kv_cache)
            pieces.append(out.logits.float())
    cached = torch.cat(pieces, dim=1)
    assert (cached - full).abs().max() <= 0.05 * full.abs().max()


def test_bf16_moe_dispatch_methods_agree(make_config, moe_flags) -> None:
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch._grouped_mm needs sm90+")
    idx = torch.randint(0, 61, (2, 16), device="cuda")
    outs = []
    for method in ("loop", "grouped_mm"):
        torch.manual_seed(0)  # the same weights for both methods
        model = LLM(make_config(**moe_flags), moe_dispatch=method).cuda().eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            outs.append(model(idx, use_cache=False).logits.float())
    assert (outs[0] - outs[1]).abs().max() <= 0.05 * outs[0].abs().max()
