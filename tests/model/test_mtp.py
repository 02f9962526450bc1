"""Multi-token prediction: D = 0 is the plain model, the loss equals a hand computation, and
the cost report counts the modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmctl.model import LLM
from llmctl.model.costs import inspect_model
from llmctl.model.positional import Positions


def _seeded(cfg) -> LLM:
    torch.manual_seed(123)
    return LLM(cfg)


@pytest.mark.parametrize("attn", ["mha", "mla"])
def test_depth_zero_is_the_plain_model_bitwise(make_config, moe_flags, attn: str) -> None:
    plain = _seeded(make_config(attn=attn, **moe_flags))
    zero = _seeded(make_config(attn=attn, mtp_depth=0, **moe_flags))
    deep = _seeded(make_config(attn=attn, mtp_depth=2, **moe_flags))
    assert list(zero.state_dict()) == list(plain.state_dict())
    assert not any(name.startswith("mtp.") for name in plain.state_dict())
    main = plain.state_dict()
    # the modules come after every main weight: same names, same init draws
    for name, value in deep.state_dict().items():
        if not name.startswith("mtp."):
            assert torch.equal(value, main[name]), name
    for name, value in zero.state_dict().items():
        assert torch.equal(value, main[name]), name
    idx = torch.randint(0, 61, (2, 12))
    targets = torch.randint(0, 61, (2, 12))
    for model in (plain, zero, deep):
        model.eval()
    with torch.no_grad():
        a, b = plain(idx, targets=targets), zero(idx, targets=targets)
        c = deep(idx, targets=targets)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    assert b.mtp_losses is None
    assert torch.equal(a.logits, c.logits)  # MTP changes no main-model output
    assert torch.equal(a.lm_loss, c.lm_loss)


def test_mtp_loss_equals_a_hand_computation(make_config) -> None:
    cfg = make_config(attn="gqa", mtp_depth=2, mtp_weight=0.25, init_std=0.1)
    model = _seeded(cfg).eval()
    idx = torch.randint(0, 61, (2, 9))
    targets = torch.cat((idx[:, 1:], torch.randint(0, 61, (2, 1))), dim=1)
    targets[0, 6] = -1  # ignored positions stay ignored at every depth
    with torch.no_grad():
        out = model(idx, targets=targets)
        # h^0: the main model's hidden states before the final norm, one prefix at a time
        T = idx.size(1)
        h = [[None] * T for _ in range(3)]
        for i in range(T):
            x = model.wte(idx[:, : i + 1]) + model.wpe(torch.arange(i + 1))
            pos = Positions(0, i + 1, x.device, cfg.rope_theta)
            for block in model.blocks:
                x, _ = block(x, pos)
            h[0][i] = x[:, -1]  # (B, C)
        losses = []
        for k, module in enumerate(model.mtp, start=1):
            nll, count = 0.0, 0
            for i in range(T - k):
                hidden = torch.stack([h[k - 1][j] for j in range(i + 1)], dim=1)  # (B, i+1, C)
                emb = model.wte(idx[:, k: k + i + 1])  # tokens j + k for j <= i
                y, _ = module(hidden, emb, Positions(0, i + 1, idx.device, cfg.rope_theta))
                h[k][i] = y[:, -1]
                logp = F.log_softmax(model.lm_head(module.norm_f(y[:, -1])), dim=-1)  # (B, V)
                for b in range(idx.size(0)):
                    target = int(targets[b, i + k])
                    if target >= 0:
                        nll -= float(logp[b, target])
                        count += 1
            losses.append(nll / count)
    assert len(out.mtp_losses) == 2
    for got, want in zip(out.mtp_losses, losses, strict=True):
        assert abs(float(got) - want) < 1e-5
    expected = float(out.lm_loss) + 0.25 * sum(losses) / 2
    assert abs(float(out.loss) - expected) < 1e-5


def test_mtp_trains_with_moe_and_activation_recomputation(make_config, aux_free_flags) -> None:
    cfg = make_config(mtp_depth=1, **aux_free_flags)
    model = LLM(cfg, act_recomp=True).train()
    idx = torch.randint(0, 61, (2, 10))
    out = model(idx, targets=idx)
    out.loss.backward()
    module = model.mtp[0]
    assert module.proj.weight.grad is not None and module.proj.weight.grad.abs().sum() > 0
    assert len(model.moe_layers) == cfg.n_layer + 1  # the module's MoE block balances too
    assert float(model.moe_load_counts()[-1].sum()) > 0


def test_costs_count_the_mtp_modules(make_config) -> None:
    plain, deep = make_config(), make_config(mtp_depth=2)
    a, b = inspect_model(plain), inspect_model(deep)
    model = LLM(deep)
    mtp_params = sum(p.numel() for p in model.mtp.parameters())
    assert b["mtp"]["params"] == mtp_params > 0
    assert b["params"]["total"] == a["params"]["total"] + mtp_params == model.num_params()
    assert b["params"]["active_non_embedding"] == a["params"]["active_non_embedding"] + mtp_params
    C, V, T = deep.n_embd, deep.vocab_size, deep.block_size
    extra = 6 * (mtp_params + 2 * V * C) + 2 * 12 * C * T
    assert b["flops"]["training_per_token"] == a["flops"]["training_per_token"] + extra
