"""Every ready config in examples/ validates and trains for 2 steps (architecture as shipped;
only the data, the batch and the context length are shrunk so that CPU can run it)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.config import load_config
from llmctl.train.trainer import train

REPO = Path(__file__).resolve().parents[2]
# fine-tuning recipes start from a trained checkpoint: tests/e2e/test_finetune_chat.py
FINETUNE = {"finetune_chat"}
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml") if p.stem not in FINETUNE)
EXPECTED = {"gpt2_small", "llama_style", "mla_rope", "mla_moe", "moe_aux_loss", "cpu_tiny",
            "heterogeneous", "cpu_fast"}


def test_every_architecture_has_an_example() -> None:
    assert {p.stem for p in EXAMPLES} == EXPECTED


@pytest.fixture(scope="module")
def data_dir(char_dataset) -> Path:
    return char_dataset("smoke", 20_000)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_validates(example: Path) -> None:
    result = CliRunner().invoke(app, ["validate-config", str(example)])
    assert result.exit_code == 0, result.output
    assert "config OK" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_trains_two_steps(example: Path, data_dir: Path, tmp_path: Path) -> None:
    shipped = load_config(example)
    run = load_config(example, overrides={
        "dataset": "smoke", "data_dir": str(data_dir), "out_dir": str(tmp_path),
        "block_size": "32", "batch_size": "1", "total_batch_size": "32", "max_iters": "2",
        "warmup_steps": "1", "eval_interval": "1", "eval_iters": "1", "log_interval": "1",
        "save_model": "false", "compile": "false"})
    assert run.model.layers == shipped.model.layers  # the architecture is the example's own
    result = train(run, verbose=False)
    assert result.step == 2 and math.isfinite(result.last_loss)
    if shipped.train.eval:
        assert result.best_val is not None
