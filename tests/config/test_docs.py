"""The README documents every config field (its table is generated from the dataclasses)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from llmctl.config.docs import END, START, parameter_table
from llmctl.config.schema import BlockConfig, LLMConfig, TrainConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_parameter_table_is_current():
    text = README.read_text(encoding="utf-8")
    block = text.split(START, 1)[1].split(END, 1)[0]
    assert block.strip() == parameter_table().strip(), (
        "README.md's parameter table is stale: run `python -m llmctl.config.docs --write "
        "README.md`")


def test_every_field_and_reference_flag_is_in_the_readme():
    text = README.read_text(encoding="utf-8")
    names = [f.name for cls in (LLMConfig, BlockConfig, TrainConfig)
             for f in dataclasses.fields(cls) if f.name != "layers"]
    names += ["total_batch_size_str", "layer_configs", "layer_configs_jsonl"]
    missing = [name for name in names if f"| `{name}` |" not in text]
    assert not missing, f"not documented in README.md: {missing}"


def test_every_field_has_help_and_a_panel():
    for cls in (LLMConfig, BlockConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help") and f.metadata.get("panel"), f.name
