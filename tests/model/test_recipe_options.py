"""Recipe options of the model: untied head, zero-initialised output projections, logit
soft-capping (QK-norm has its own file)."""

from __future__ import annotations

import pytest
import torch

from llmctl.config import load_config
from llmctl.core.errors import ConfigError
from llmctl.model import LLM
from llmctl.model.costs import parameter_counts


def test_untied_head_is_a_separate_matrix_counted_once(make_config) -> None:
    tied, untied = LLM(make_config()), LLM(make_config(tie_embeddings=False))
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_params() - tied.num_params() == 61 * 32
    # both count the head with the embeddings: equal non-embedding parameters
    assert untied.num_params(exclude_embeddings=True) == tied.num_params(exclude_embeddings=True)
    counts = parameter_counts(make_config(tie_embeddings=False))
    assert counts["embedding"] == parameter_counts(make_config())["embedding"] + 61 * 32


@pytest.mark.parametrize("attn", ["mha", "mla"])
def test_zero_init_makes_every_block_the_identity(make_config, moe_flags, attn: str) -> None:
    model = LLM(make_config(attn=attn, zero_init_proj=True, tie_embeddings=False, **moe_flags))
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        for block in model.blocks:
            from llmctl.model.positional import Positions

            y, _ = block(x, Positions(0, 5, x.device, 10000.0))
            assert torch.equal(y, x)
        assert torch.count_nonzero(model.lm_head.weight) == 0
        assert torch.count_nonzero(model.wte.weight) > 0  # the embedding keeps its init
    # without the option the projections are random
    plain = LLM(make_config(attn=attn))
    assert torch.count_nonzero(plain.blocks[0].attn.proj.weight) > 0


def test_soft_cap_bounds_logits_and_is_tanh(make_config) -> None:
    torch.manual_seed(0)
    idx = torch.randint(0, 61, (2, 9))
    plain = LLM(make_config(init_std=1.0)).eval()
    capped = LLM(make_config(init_std=1.0, logit_softcap=3.0)).eval()
    capped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        raw, out = plain(idx).logits, capped(idx).logits
    assert raw.abs().max() > 3.0
    assert out.abs().max() < 3.0
    assert torch.allclose(out, 3.0 * torch.tanh(raw / 3.0), atol=1e-5)
    # the cached path caps too
    with torch.no_grad():
        first = capped(idx[:, :4])
        step = capped(idx[:, 4:5], kv_cache=first.kv_cache).logits
    assert torch.allclose(step[:, 0], out[:, 4], atol=1e-5)


def test_negative_soft_cap_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.logit_softcap"):
        load_config(overrides={"logit_softcap": -1.0}, check_batch_split=False)
