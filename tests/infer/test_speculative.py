"""Self-speculative decoding: greedy equals plain greedy, sampling follows the main model."""

from __future__ import annotations

import pytest
import torch

from llmctl.config import load_config
from llmctl.core.errors import LlmctlError
from llmctl.infer.decode import generate
from llmctl.infer.sampling import next_token_probs
from llmctl.infer.speculative import SpeculativeStats, stream_speculative
from llmctl.model import LLM

ARCHS = {
    "mha": {"attn": "mha"},
    "gqa": {"attn": "gqa", "pos_emb": "rope"},
    "mla": {"attn": "mla", "pos_emb": "rope"},
    "moe": {"attn": "gqa", "moe": True, "n_exp": 4, "n_shared": 1, "n_act": 2, "coeff": 0.01},
    "mla-alibi": {"attn": "mla", "pos_emb": "alibi"},
}


def _model(**flags) -> LLM:
    base = dict(n_layer=2, n_embd=32, n_head=4, n_kv_heads=2, vocab_size=53, block_size=24,
                up_dim=48, q_latent_dim=16, kv_latent_dim=8, rope_head_dim=4, init_std=0.1)
    torch.manual_seed(0)
    return LLM(load_config(overrides={**base, **flags}, check_batch_split=False).model).eval()


def _speculative(model, prompt, n, **kwargs):
    stats = SpeculativeStats()
    tokens = list(stream_speculative(model, prompt, n, stats=stats, **kwargs))
    return torch.cat((prompt, torch.stack(tokens, dim=1)), dim=1), stats


def _teach_mtp_to_copy_the_main_model(model: LLM) -> None:
    """A few steps of MTP-only training on the model's own greedy text, so that drafts are
    often right and the acceptance path is exercised (untrained modules rarely agree)."""
    torch.manual_seed(1)
    text = generate(model, torch.randint(0, 53, (8, 2)), 20, temperature=0)
    opt = torch.optim.Adam(model.mtp.parameters(), lr=3e-2)
    model.train()
    for _ in range(30):
        out = model(text[:, :-1], targets=text[:, 1:])
        opt.zero_grad()
        torch.stack(out.mtp_losses).mean().backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_equals_plain_greedy(arch: str, depth: int) -> None:
    model = _model(mtp_depth=depth, **ARCHS[arch])
    _teach_mtp_to_copy_the_main_model(model)
    prompt = torch.randint(0, 53, (1, 4))
    plain = generate(model, prompt, 30, temperature=0)  # past block_size 24 at the end
    got, stats = _speculative(model, prompt, 30, temperature=0)
    assert torch.equal(got, plain)
    assert 0 <= stats.acceptance_rate <= 1
    assert stats.accepted > 0 and stats.drafted > stats.accepted * 0  # drafts were checked
    assert stats.tokens == 30 and stats.main_forwards < 30  # fewer main forwards than tokens


def test_eot_and_max_new_tokens_stop_like_plain_decoding() -> None:
    model = _model(mtp_depth=2)
    _teach_mtp_to_copy_the_main_model(model)
    prompt = torch.randint(0, 53, (1, 3))
    plain = generate(model, prompt, 12, temperature=0)
    eot = int(plain[0, 8])  # a token the greedy text reaches
    want = generate(model, prompt, 12, temperature=0, eot_id=eot)
    got, _ = _speculative(model, prompt, 12, temperature=0, eot_id=eot)
    assert torch.equal(got, want)
    for n in (1, 2, 5):
        assert torch.equal(_speculative(model, prompt, n, temperature=0)[0], plain[:, :3 + n])


def test_sampling_follows_the_main_models_distribution() -> None:
    # The second new token is drafted by an untrained MTP module (q far from p): speculative
    # sampling must still give the main model's marginal sum_a p(a) p(b | a).
    model = _model(mtp_depth=1, vocab_size=6, init_std=0.3)
    prompt = torch.tensor([[1, 4, 2]])
    with torch.no_grad():
        p_first = next_token_probs(model(prompt).logits[:, -1])[0]  # (V,)
        follow = torch.cat((prompt.expand(6, 3), torch.arange(6)[:, None]), dim=1)
        p_second = next_token_probs(model(follow).logits[:, -1])  # (V, V)
    exact = p_first @ p_second  # (V,)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    stats = SpeculativeStats()
    for _ in range(1500):
        # 3 tokens: the second one is then a draft (accepted or resampled)
        tokens = list(stream_speculative(model, prompt, 3, temperature=1.0, top_k=None,
                                         generator=generator, stats=stats))
        counts[int(tokens[1])] += 1
    empirical = counts / counts.sum()
    assert 0.5 * (empirical - exact).abs().sum() < 0.06
    assert 0 < stats.acceptance_rate < 1  # both branches (accept / resample) were taken


def test_needs_mtp_modules() -> None:
    with pytest.raises(LlmctlError, match="mtp_depth"):
        list(stream_speculative(_model(), torch.tensor([[1, 2]]), 3))
