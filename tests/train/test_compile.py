"""--compile on CPU: torch.compile (inductor) trains to the same losses as eager, MoE included."""

from __future__ import annotations

import shutil

import pytest

from llmctl.config import load_config
from llmctl.train.trainer import Trainer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                       reason="inductor needs a C compiler on CPU"),
]


def test_compiled_training_matches_eager(tiny, records, hetero):
    curves = []
    for compiled in (False, True):
        flags = tiny(file_name=f"compile_{compiled}", compile=compiled, max_iters=3, **hetero)
        result = Trainer(load_config(overrides=flags), verbose=False).fit()
        curves.append(records(result.run_dir))
    eager, compiled = curves
    assert len(eager) == len(compiled) == 3
    for a, b in zip(eager, compiled, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        assert b["imbalance"] == pytest.approx(a["imbalance"], abs=1e-6)  # counted once
