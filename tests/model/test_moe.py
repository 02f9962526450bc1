"""Mixture of experts: routing, gates, shared experts, dispatch, aux losses and balancing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmctl.config import BlockConfig
from llmctl.infer.decode import generate
from llmctl.model import LLM
from llmctl.model.mlp import ACTIVATIONS, is_gated
from llmctl.model.moe import MoE, grouped_matmul


def _moe(aux_free: bool, non_linearity: str = "swiglu", n_exp: int = 7, n_shared: int = 2,
         n_act: int = 4, n_embd: int = 16, dispatch: str = "auto") -> MoE:
    block = BlockConfig(moe=True, n_exp=n_exp, n_shared=n_shared, n_act=n_act, up_dim=8,
                        non_linearity=non_linearity, aux_free=aux_free, coeff=0.1,
                        alpha=0.3, gamma=0.05)
    moe = MoE(block, n_embd=n_embd, dropout=0.0, dispatch=dispatch)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.4)
    if aux_free:  # a bias large enough to change which experts win
        moe.expert_bias.copy_(torch.randn(moe.n_routed) * 0.3)
    return moe


def _act(h: torch.Tensor, non_linearity: str) -> torch.Tensor:
    return ACTIVATIONS[non_linearity](h)


def _reference(moe: MoE, x: torch.Tensor, non_linearity: str) -> torch.Tensor:
    """Token by token, expert by expert; shared experts as separate MLPs."""
    U = moe.experts.w_down.shape[1]
    n_shared = 0 if moe.shared is None else moe.shared.down.weight.shape[1] // U
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        logits = moe.router.weight @ x[n]  # (E,)
        if moe.aux_free:
            s = torch.sigmoid(logits)
            chosen = torch.argsort(s + moe.expert_bias, descending=True)[: moe.top_k]
            gates = s[chosen] / s[chosen].sum()
        else:
            s = torch.softmax(logits, dim=-1)
            chosen = torch.argsort(s, descending=True)[: moe.top_k]
            gates = s[chosen]
        for g, e in zip(gates, chosen, strict=True):
            h = x[n] @ moe.experts.w_up[e]
            if is_gated(non_linearity):
                h = _act(h[:U], non_linearity) * h[U:]
            else:
                h = _act(h, non_linearity)
            out[n] += g * (h @ moe.experts.w_down[e])
        for i in range(n_shared):  # each shared expert is its own slice of the fused MLP
            up, down = moe.shared.up.weight, moe.shared.down.weight
            if is_gated(non_linearity):
                gate = up[i * U:(i + 1) * U] @ x[n]
                value = up[(n_shared + i) * U:(n_shared + i + 1) * U] @ x[n]
                h = _act(gate, non_linearity) * value
            else:
                h = _act(up[i * U:(i + 1) * U] @ x[n], non_linearity)
            out[n] += down[:, i * U:(i + 1) * U] @ h
    return out


@pytest.mark.parametrize("dispatch", ["loop", "grouped_mm"])
@pytest.mark.parametrize("non_linearity", ["swiglu", "gelu", "relu2"])
@pytest.mark.parametrize("aux_free", [False, True])
def test_output_equals_slow_reference(aux_free: bool, non_linearity: str, dispatch: str) -> None:
    torch.manual_seed(4)
    moe = _moe(aux_free, non_linearity, dispatch=dispatch).eval()
    x = torch.randn(2, 9, 16)
    y, aux = moe(x)
    expected = _reference(moe, x.reshape(-1, 16), non_linearity).view(2, 9, 16)
    assert (y - expected).abs().max() <= 1e-5
    assert aux.item() == 0.0  # balancing terms are training-only


@pytest.mark.parametrize("dispatch", ["loop", "grouped_mm"])
@pytest.mark.parametrize("aux_free", [False, True])
def test_gradients_equal_the_slow_reference(aux_free: bool, dispatch: str) -> None:
    """The dispatch / combine backward (gathers instead of autograd's scatter-add) gives the
    gradients of the token-by-token reference, for the input, every weight and the gates."""
    torch.manual_seed(5)
    moe = _moe(aux_free, "gelu", dispatch=dispatch)
    x = torch.randn(2, 9, 16, requires_grad=True)
    upstream = torch.randn(2, 9, 16)
    (moe(x)[0] * upstream).sum().backward()
    ours = [x.grad] + [p.grad for p in moe.parameters()]
    x.grad = None
    moe.zero_grad()
    (_reference(moe, x.reshape(-1, 16), "gelu").view(2, 9, 16) * upstream).sum().backward()
    theirs = [x.grad] + [p.grad for p in moe.parameters()]
    for a, b in zip(ours, theirs, strict=True):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@pytest.mark.parametrize("aux_free", [False, True])
def test_routing_picks_top_k_and_gates_use_unbiased_scores(aux_free: bool) -> None:
    torch.manual_seed(5)
    moe = _moe(aux_free)
    x = torch.randn(40, 16)
    scores, idx, gates = moe.route(x)
    assert idx.shape == (40, moe.top_k) == (40, 4 - 2)
    logits = x @ moe.router.weight.T
    expected_scores = torch.sigmoid(logits) if aux_free else torch.softmax(logits, -1)
    assert torch.allclose(scores, expected_scores, atol=1e-6)
    selection = expected_scores + (moe.expert_bias if aux_free else 0.0)
    expected_idx = selection.topk(moe.top_k, dim=-1).indices
    assert torch.equal(idx.sort(-1).values, expected_idx.sort(-1).values)
    picked = expected_scores.gather(-1, idx)
    expected_gates = picked / picked.sum(-1, keepdim=True) if aux_free else picked
    assert torch.allclose(gates, expected_gates, atol=1e-6)
    if aux_free:  # the bias changed some choices, so the check above is not vacuous
        unbiased = expected_scores.topk(moe.top_k, dim=-1).indices.sort(-1).values
        assert not torch.equal(unbiased, idx.sort(-1).values)


def test_shared_experts_run_on_every_token() -> None:
    torch.manual_seed(6)
    moe = _moe(False).eval()
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        with_shared, _ = moe(x)
        moe.experts.w_down.zero_()  # routed experts now contribute nothing
        only_shared, _ = moe(x)
    assert torch.allclose(only_shared, moe.shared(x), atol=1e-6)
    assert only_shared.abs().min(dim=-1).values.gt(0).all()
    assert not torch.allclose(with_shared, only_shared)


@pytest.mark.parametrize("width", [8, 5])  # 5 fp32 = 20-byte rows: grouped_mm cannot run
def test_grouped_matmul_methods_agree_including_empty_groups(width: int) -> None:
    x = torch.randn(10, width)
    w = torch.randn(4, width, 12)
    counts = torch.tensor([3, 0, 7, 0])
    expected = torch.cat([x[:3] @ w[0], x[3:] @ w[2]])
    methods = ("loop", "grouped_mm", "auto") if width % 4 == 0 else ("loop", "auto")
    for method in methods:
        assert torch.allclose(grouped_matmul(x, w, counts, method), expected, atol=1e-5)


@pytest.mark.parametrize("method", ["loop", "grouped_mm"])
@pytest.mark.parametrize("scaled", [True, False])
def test_grouped_matmul_gradients_equal_per_group_autograd(method: str, scaled: bool) -> None:
    """The loop's own backward (row scale folded in, preallocated gradients) against
    autograd through plain per-group matmuls; the unused experts get zero gradients."""
    torch.manual_seed(3)
    counts = torch.tensor([3, 0, 5, 2, 0])
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(5, 8, 12, requires_grad=True)
    scale = torch.rand(10, requires_grad=True) if scaled else None
    upstream = torch.randn(10, 12)
    (grouped_matmul(x, w, counts, method, row_scale=scale) * upstream).sum().backward()
    got = [x.grad, w.grad] + ([scale.grad] if scaled else [])

    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((scale,) if scaled else ())]
    x_ref, w_ref = leaves[:2]
    parts = [x_ref[:3] @ w_ref[0], x_ref[3:8] @ w_ref[2], x_ref[8:] @ w_ref[3]]
    out = torch.cat(parts) * (leaves[2][:, None] if scaled else 1.0)
    (out * upstream).sum().backward()
    for mine, ref in zip(got, (leaf.grad for leaf in leaves), strict=True):
        assert torch.allclose(mine, ref, atol=1e-5)
    assert w.grad[[1, 4]].eq(0).all()


def test_standard_aux_loss_formula() -> None:
    torch.manual_seed(7)
    moe = _moe(False).train()
    B, T = 3, 8
    x = torch.randn(B, T, 16)
    _, aux = moe(x)
    scores, idx, _ = moe.route(x.reshape(-1, 16))
    E, k, N = moe.n_routed, moe.top_k, B * T
    expected = 0.0
    for i in range(E):
        f_i = E / (k * N) * (idx == i).sum().item()
        p_i = scores[:, i].mean().item()
        expected += f_i * p_i
    assert aux.item() == pytest.approx(0.1 * expected, rel=1e-5)


def test_aux_free_complementary_loss_formula() -> None:
    torch.manual_seed(8)
    moe = _moe(True).train()
    B, T = 3, 8
    x = torch.randn(B, T, 16)
    _, aux = moe(x)
    scores, idx, _ = moe.route(x.reshape(-1, 16))
    E, k = moe.n_routed, moe.top_k
    scores, idx = scores.view(B, T, E), idx.view(B, T, k)
    total = 0.0
    for b in range(B):
        normed = scores[b] / scores[b].sum(-1, keepdim=True)
        for i in range(E):
            f_i = E / (k * T) * (idx[b] == i).sum().item()
            total += f_i * normed[:, i].mean().item()
    assert aux.item() == pytest.approx(0.3 * total / B, rel=1e-5)


def test_aux_loss_reaches_the_model_loss(make_config, mixed_layers) -> None:
    model = LLM(make_config(layer_configs=mixed_layers, n_layer=None))
    idx = torch.randint(0, 61, (2, 12))
    out = model(idx, targets=idx)
    assert out.aux_loss.dim() == 0 and out.aux_loss.item() > 0
    assert torch.allclose(out.loss, out.lm_loss + out.aux_loss)
    assert torch.allclose(out.lm_loss, F.cross_entropy(out.logits.view(-1, 61), idx.view(-1)))
    dense = LLM(make_config())
    zero = dense(idx, targets=idx).aux_loss
    assert zero.dim() == 0 and zero.item() == 0.0


# ---------------------------------------------------------------- aux-free balancing


def _routed_counts(model: LLM, idx: torch.Tensor) -> list[torch.Tensor]:
    """Expected per-layer counts, recomputed by hooking each MoE layer's input."""
    inputs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: inputs.append(a[0]))
             for layer in model.moe_layers]
    with torch.no_grad():
        was = model.training
        model.eval()
        model(idx, use_cache=False)
        model.train(was)
    for h in hooks:
        h.remove()
    counts = []
    for layer, x in zip(model.moe_layers, inputs, strict=True):
        _, chosen, _ = layer.route(x.reshape(-1, x.shape[-1]))
        counts.append(torch.bincount(chosen.flatten(), minlength=layer.n_routed).float())
    return counts


def test_bias_moves_toward_balance_in_training_only(make_config, aux_free_flags) -> None:
    model = LLM(make_config(**aux_free_flags, n_layer=2))
    idx = torch.randint(0, 61, (4, 16))
    biases = [layer.expert_bias.clone() for layer in model.moe_layers]
    model.train()
    model(idx, targets=idx).loss.backward()
    counts = model.moe_load_counts()
    expected = _routed_counts(model, idx)
    for got, want in zip(counts, expected, strict=True):
        assert torch.equal(got, want)
        assert got.dtype == torch.float32 and got.sum() == 4 * 16 * 2  # tokens * top_k
    model.update_expert_biases(counts)
    for layer, before, load in zip(model.moe_layers, biases, counts, strict=True):
        delta = layer.expert_bias - before
        mean = load.mean()
        assert torch.allclose(delta[load < mean], torch.tensor(0.01))  # under-loaded: up
        assert torch.allclose(delta[load > mean], torch.tensor(-0.01))  # over-loaded: down
        assert torch.equal(delta[load == mean], torch.zeros_like(delta[load == mean]))
        assert (load != mean).any()
    # counters were reset by the update
    assert all(c.sum() == 0 for c in model.moe_load_counts())


def test_no_counting_in_eval_or_generation(make_config, aux_free_flags) -> None:
    model = LLM(make_config(**aux_free_flags))
    idx = torch.randint(0, 61, (2, 8))
    model.eval()
    model(idx, targets=idx)
    generate(model.train(), idx, 5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.train()(idx, targets=idx)  # no gradients: an evaluation, not a training step
    assert all(c.sum() == 0 for c in model.moe_load_counts())
    biases = [layer.expert_bias.clone() for layer in model.moe_layers]
    model.update_expert_biases(model.moe_load_counts())  # all-zero loads: nothing to fix
    for layer, before in zip(model.moe_layers, biases, strict=True):
        assert torch.equal(layer.expert_bias, before)


def test_counts_accumulate_over_micro_steps_and_not_twice_under_recompute(
        make_config, aux_free_flags) -> None:
    idx_a, idx_b = torch.randint(0, 61, (2, 2, 10))
    counts = {}
    for recomp in (False, True):
        torch.manual_seed(0)
        model = LLM(make_config(**aux_free_flags), act_recomp=recomp)
        for idx in (idx_a, idx_b):
            model(idx, targets=idx).loss.backward()
        counts[recomp] = model.moe_load_counts()
    for plain, recomputed in zip(counts[False], counts[True], strict=True):
        assert torch.equal(plain, recomputed)
        assert plain.sum() == 2 * (2 * 10 * 2)  # two micro-steps, 20 tokens, top-2


def test_counters_are_not_buffers_but_the_bias_is_persistent(make_config,
                                                             aux_free_flags) -> None:
    model = LLM(make_config(**aux_free_flags))
    idx = torch.randint(0, 61, (2, 8))
    model(idx, targets=idx).loss.backward()
    buffers = dict(model.named_buffers())
    assert all(name.endswith("expert_bias") for name in buffers)
    assert len(buffers) == 2
    state = model.state_dict()
    assert "blocks.0.ffn.expert_bias" in state
    assert not any("load" in name for name in state)


def _violation(moe: MoE, x: torch.Tensor) -> float:
    with torch.no_grad():
        _, idx, _ = moe.route(x.reshape(-1, x.shape[-1]))
    load = torch.bincount(idx.flatten(), minlength=moe.n_routed).float()
    return (load.max() / load.mean() - 1).item()


@pytest.mark.parametrize("aux_free", [False, True])
def test_training_from_a_skewed_router_lowers_max_load_violation(aux_free: bool) -> None:
    torch.manual_seed(9)
    block = BlockConfig(moe=True, n_exp=9, n_shared=1, n_act=3, up_dim=8,
                        non_linearity="gelu", aux_free=aux_free, coeff=1.0, alpha=0.01,
                        gamma=0.02)
    moe = MoE(block, n_embd=16, dropout=0.0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.1)
    u = torch.randn(16)
    x = torch.randn(8, 32, 16) * 0.3 + u
    with torch.no_grad():  # every token prefers expert 0
        moe.router.weight[0] = 4 * u / u.norm() ** 2
    target = torch.randn(8, 32, 16)
    before = _violation(moe, x)
    assert before > 2.0
    opt = torch.optim.Adam(moe.parameters(), lr=0.01)
    moe.train()
    for _ in range(40):
        y, aux = moe(x)
        loss = F.mse_loss(y, target) + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        moe.update_bias(moe.load_counts())
    after = _violation(moe, x)
    assert after < 0.5 * before


def _recording_grouped_mm(monkeypatch) -> list[torch.dtype]:
    """Replace torch._grouped_mm by a wrapper that records the dtype of each call."""
    calls: list[torch.dtype] = []
    real = torch._grouped_mm

    def recording(a, b, **kw):
        calls.append(a.dtype)
        return real(a, b, **kw)

    monkeypatch.setattr(torch, "_grouped_mm", recording)
    return calls


def test_auto_dispatch_on_a_cpu_is_the_grouped_gemm_where_it_can_run(monkeypatch) -> None:
    """On a CPU with torch >= 2.9 `auto` takes torch's grouped GEMM for fp32 and bf16 rows
    of 16-byte multiples (measured faster than the loop there), forward and backward."""
    import llmctl.model.moe as moe

    if not moe._CPU_GROUPED_MM:
        pytest.skip("torch < 2.9 has no CPU grouped GEMM")
    torch.manual_seed(0)
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(3, 16, 16, requires_grad=True)
    counts, scale = torch.tensor([3, 0, 5]), torch.rand(8)
    expected = torch.cat([x[:3] @ w[0], x[3:] @ w[2]]) * scale[:, None]
    calls = _recording_grouped_mm(monkeypatch)
    out = grouped_matmul(x, w, counts, "auto", row_scale=scale)
    assert calls == [torch.float32]
    assert torch.allclose(out, expected, atol=1e-5)
    got = torch.autograd.grad(out.square().sum(), (x, w))
    want = torch.autograd.grad(expected.square().sum(), (x, w))
    assert all(torch.allclose(g, r, atol=1e-4) for g, r in zip(got, want, strict=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grouped_matmul(x, w, counts, "auto")
    assert calls[-1] == torch.bfloat16


def test_auto_dispatch_on_a_cpu_runs_the_loop_elsewhere(monkeypatch) -> None:
    """The loop where the grouped GEMM cannot run: rows of 20 bytes, fp16, inside
    torch.compile (its shape function takes bf16 only), torch before 2.9."""
    import llmctl.model.moe as moe

    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5])
    calls = _recording_grouped_mm(monkeypatch) if hasattr(torch, "_grouped_mm") else []

    def check(x: torch.Tensor, w: torch.Tensor) -> None:
        assert not moe._grouped_mm_supported(x, w)
        expected = torch.cat([x[:3].float() @ w[0].float(), x[3:].float() @ w[2].float()])
        got = grouped_matmul(x, w, counts, "auto")
        assert torch.allclose(got.float(), expected, atol=1e-2, rtol=1e-2)

    check(torch.randn(8, 5), torch.randn(3, 5, 16))  # 20-byte input rows
    check(torch.randn(8, 16), torch.randn(3, 16, 5))  # 20-byte output rows
    check(torch.randn(8, 16).half(), torch.randn(3, 16, 16).half())
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        check(torch.randn(8, 16), torch.randn(3, 16, 16))
    assert calls == []
    monkeypatch.setattr(moe, "_CPU_GROUPED_MM", False)
    monkeypatch.setattr(torch, "_grouped_mm", None, raising=False)  # would fail if called
    check(torch.randn(8, 16), torch.randn(3, 16, 16))
    check(torch.randn(8, 16).bfloat16(), torch.randn(3, 16, 16).bfloat16())

@pytest.mark.parametrize("aux_free", [False, True])
@pytest.mark.parametrize("non_linearity", ["gelu", "swiglu"])
@pytest.mark.parametrize("n_shared", [0, 1])
@pytest.mark.parametrize("autocast", [False, True])
def test_few_rows_without_gradients_equal_the_sorted_dispatch(
        aux_free: bool, non_linearity: str, n_shared: int, autocast: bool, monkeypatch) -> None:
    """A decoding step (few rows, most experts idle, no gradients) multiplies each (row,
    expert) pair on its own: one fp32 row gives exactly the sorted dispatch's numbers, two
    rows and bf16 autocast the same to rounding; with gradients, in training or with more
    pairs than routed experts, the sorted dispatch runs."""
    import llmctl.model.moe as moe_module

    torch.manual_seed(1)
    moe = _moe(aux_free, non_linearity, n_exp=8, n_shared=n_shared, n_act=n_shared + 3,
               n_embd=32).eval()  # 3 of 8 - n_shared routed experts per token
    sorted_calls = []
    sorted_forward = moe_module.RoutedExperts.forward

    def counting(self, *args, **kw):
        sorted_calls.append(args[0].shape[0])
        return sorted_forward(self, *args, **kw)

    monkeypatch.setattr(moe_module.RoutedExperts, "forward", counting)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for rows in (1, 2):
            x = torch.randn(rows, 1, 32)
            with torch.no_grad():
                few, aux = moe(x)
            assert sorted_calls == [] and aux == 0
            batched, _ = moe(x.requires_grad_())  # gradients wanted: the sorted dispatch
            assert sorted_calls == [rows]
            sorted_calls.clear()
            assert few.dtype == batched.dtype
            if rows == 1 and not autocast:
                assert torch.equal(few, batched.detach())
            else:  # bf16: the combine's index_add rounds the sum in another order
                tol = 2e-2 if autocast else 1e-6
                assert torch.allclose(few.float(), batched.detach().float(), atol=tol,
                                      rtol=tol)
        with torch.no_grad():
            moe(torch.randn(3, 1, 32))  # 9 pairs > 8 - n_shared routed experts
            assert sorted_calls == [3]
            moe.train()
            moe(torch.randn(1, 1, 32))  # training: the aux loss needs the expert counts
            assert sorted_calls == [3, 1]
