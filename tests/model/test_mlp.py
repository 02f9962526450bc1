"""Every non_linearity of the config, plain and gated, against its formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmctl.config.schema import GATED_NON_LINEARITIES, NON_LINEARITIES
from llmctl.model.mlp import MLP

FORMULAS = {
    "relu": lambda x: x.clamp(min=0),
    "relu2": lambda x: x.clamp(min=0) ** 2,
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / 2**0.5)),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5
                                                     * (x + 0.044715 * x**3))),
    "silu": lambda x: x * torch.sigmoid(x),
    "swish": lambda x: x * torch.sigmoid(x),
    "mish": lambda x: x * torch.tanh(torch.log1p(torch.exp(x))),
    "selu": lambda x: 1.0507009873554805 * torch.where(
        x > 0, x, 1.6732632423543772 * (torch.exp(x) - 1)),
    "celu": lambda x: torch.where(x > 0, x, torch.exp(x) - 1),
    "elu": lambda x: torch.where(x > 0, x, torch.exp(x) - 1),
    "lrelu": lambda x: torch.where(x > 0, x, 0.01 * x),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": lambda x: torch.log1p(torch.exp(x)),
    "glu": torch.sigmoid,
    "swiglu": lambda x: x * torch.sigmoid(x),
    "geglu": lambda x: 0.5 * x * (1 + torch.erf(x / 2**0.5)),
    "reglu": lambda x: x.clamp(min=0),
}


def test_every_configurable_activation_has_a_formula_here() -> None:
    assert set(FORMULAS) == set(NON_LINEARITIES)


@pytest.mark.parametrize("non_linearity", NON_LINEARITIES)
def test_mlp_matches_formula(non_linearity: str) -> None:
    torch.manual_seed(0)
    mlp = MLP(8, 6, non_linearity)
    x = torch.randn(3, 5, 8)
    gated = non_linearity in GATED_NON_LINEARITIES
    assert mlp.up.weight.shape == ((12 if gated else 6), 8)
    act = FORMULAS[non_linearity]
    h = x @ mlp.up.weight.T
    h = act(h[..., :6]) * h[..., 6:] if gated else act(h)
    assert torch.allclose(mlp(x), h @ mlp.down.weight.T, atol=1e-5)


def test_dropout_only_in_training() -> None:
    mlp = MLP(8, 16, "gelu", dropout=0.5)
    x = torch.randn(4, 8)
    assert torch.equal(mlp.eval()(x), mlp(x))
    assert not torch.equal(mlp.train()(x), F.linear(F.gelu(x @ mlp.up.weight.T),
                                                    mlp.down.weight))
