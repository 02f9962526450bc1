"""inspect-params through the real CLI: flags, files, checkpoint folders, JSON, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.config import load_config
from llmctl.model import LLM
from llmctl.model.costs import inspect_model
from llmctl.runtime.device import activation_bytes

runner = CliRunner()
SMALL = ["--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--vocab_size", "100",
         "--block_size", "32", "--up_dim", "96"]
ARCHS = {
    "mha": [],
    "gqa-swiglu": ["--attn", "gqa", "--n_kv_heads", "2", "--non_linearity", "swiglu",
                   "--pos_emb", "rope", "--norm", "rms"],
    "mla": ["--attn", "mla", "--q_latent_dim", "32", "--kv_latent_dim", "16",
            "--rope_head_dim", "8", "--pos_emb", "rope"],
    "moe": ["--moe", "--n_exp", "8", "--n_shared", "1", "--n_act", "3", "--coeff", "0.01"],
    "aux-free": ["--moe", "--n_exp", "8", "--n_shared", "0", "--n_act", "2", "--aux_free",
                 "--alpha", "0.001", "--gamma", "0.01"],
}


def invoke(*args: str):
    return runner.invoke(app, ["inspect-params", *args])


def _flags_to_overrides(flags: list[str]) -> dict[str, object]:
    out, i = {}, 0
    while i < len(flags):
        name = flags[i].lstrip("-")
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            out[name] = flags[i + 1]
            i += 2
        else:
            out[name] = True
            i += 1
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_json_report_counts_the_real_model(arch: str) -> None:
    result = invoke(*SMALL, *ARCHS[arch], "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    cfg = load_config(overrides=_flags_to_overrides(SMALL + ARCHS[arch]),
                      check_batch_split=False).model
    assert report["params"]["total"] == sum(p.numel() for p in LLM(cfg).parameters())
    assert {"params", "layers", "flops", "kv_cache", "memory"} <= report.keys()
    if "moe" in arch or "aux" in arch:
        assert report["params"]["active_per_token"] < report["params"]["total"]


def test_human_report() -> None:
    result = invoke(*SMALL, *ARCHS["moe"])
    assert result.exit_code == 0, result.output
    total = json.loads(invoke(*SMALL, *ARCHS["moe"], "--json").output)["params"]["total"]
    for text in ("total", "active per token", "non-embedding", "per layer", "FLOPs per token",
                 "KV cache", "act_recomp", f"{total:,}"):
        assert text in result.output


def test_config_file_and_flags_take_precedence(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text("n_layer: 3\nn_embd: 64\nn_head: 4\nvocab_size: 100\nblock_size: 32\n"
                    "attn: gqa\nn_kv_heads: 2\n")
    a = json.loads(invoke(str(path), "--json").output)
    b = json.loads(invoke("--config", str(path), "--n_layer", "5", "--json").output)
    assert a["model"]["n_layer"] == 3 and len(a["layers"]) == 3
    assert b["model"]["n_layer"] == 5 and b["params"]["total"] > a["params"]["total"]


def test_checkpoint_and_run_folder(tmp_path: Path) -> None:
    run = load_config(overrides=_flags_to_overrides(SMALL + ARCHS["mla"]),
                      check_batch_split=False)
    payload = {"config": run.to_dict(), "step": 7,
               "tokenizer": {"kind": "tiktoken", "name": "gpt2"}}
    (tmp_path / "latest").mkdir()
    (tmp_path / "latest" / "config.json").write_text(json.dumps(payload))
    result = invoke(str(tmp_path / "latest"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(invoke(str(tmp_path), "--json").output) == json.loads(result.output)
    result = invoke(str(tmp_path), "--json")  # the run folder: its latest checkpoint
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    width = activation_bytes(run.train.device, run.train.dtype)
    assert report == json.loads(json.dumps(inspect_model(run.model, run.train,
                                                         activation_bytes=width)))
    # flags still apply on top of the checkpoint's config (e.g. a batch size for memory)
    bigger = json.loads(invoke(str(tmp_path), "--batch_size", "8", "--json").output)
    assert bigger["memory"]["activations"] == 4 * report["memory"]["activations"]


def _bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    cases = {}
    for name, content in {
        "no-config": None,
        "bad-json": "{not json",
        "no-config-key": json.dumps({"step": 3}),
        "config-not-object": json.dumps({"config": [1, 2]}),
        "invalid-config": json.dumps({"config": {"model": {"n_embd": 30, "n_head": 4}}}),
        "binary": b"\x00\x01\x02",
    }.items():
        folder = tmp_path / name
        folder.mkdir()
        if isinstance(content, bytes):
            (folder / "config.json").write_bytes(content)
        elif content is not None:
            (folder / "config.json").write_text(content)
        cases[name] = folder
    return cases


@pytest.mark.parametrize("case", ["no-config", "bad-json", "no-config-key", "config-not-object",
                                  "invalid-config", "binary", "missing-path", "bad-flag"])
def test_bad_input_exits_2_without_traceback(tmp_path: Path, case: str) -> None:
    if case == "missing-path":
        args = [str(tmp_path / "nope.yaml")]
    elif case == "bad-flag":
        args = ["--n_embd", "30", "--n_head", "4"]
    else:
        args = [str(_bad_checkpoints(tmp_path)[case])]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "error" in result.output.lower()


def test_help() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for text in ("--json", "--config", "--n_layer", "checkpoint"):
        assert text in result.output
