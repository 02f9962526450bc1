"""validate-config through the real CLI: summaries, JSON round trip, and a corpus of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.config import load_config

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()
SMALL = ["--block_size", "64", "--total_batch_size", "128"]


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_help_lists_every_command_instantly():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("prepare", "validate-config", "train", "eval", "sample", "export",
                    "inspect-params"):
        assert command in result.output
    out = subprocess.run([sys.executable, "-c", "import sys, llmctl.cli; "
                          "print('torch' in sys.modules)"], capture_output=True, text=True)
    assert out.stdout.strip() == "False"  # --help never pays for importing torch


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.startswith("llmctl ")


def test_validate_help_shows_both_spellings_and_panels():
    result = invoke("validate-config", "--help")
    assert result.exit_code == 0
    for text in ("--n_layer", "--aux_free", "--no_aux_free", "--layer_configs_jsonl",
                 "--total_batch_size_str", "Attention", "MoE"):
        assert text in result.output


# Command lines as parameters.md and the reference scripts write them.
REFERENCE_LINES = [
    ["--dataset", "shakespeare", "--total_batch_size_str", "2**11", "--batch_size", "2",
     "--max_iters", "100", "--learning_rate", "7e-5", "--warmup_steps", "50", "--grad_clip",
     "0.9", "--eval", "--eval_interval", "25", "--eval_iters", "10", "--save_model",
     "--ckpt_interval", "20", "--file_name", "llm_model", "--act_recomp", "--wandb_log",
     "--wandb_project", "llms", "--wandb_run_name", "trial", "--n_layer", "5", "--n_embd", "512",
     "--vocab_size", "50304", "--block_size", "512", "--dropout", "0.01", "--pos_emb", "rope",
     "--norm", "rms", "--up_dim", "256", "--non_linearity", "swiglu", "--attn", "mla",
     "--n_head", "8", "--n_kv_heads", "4", "--q_latent_dim", "32", "--kv_latent_dim", "32",
     "--rope_head_dim", "16", "--moe", "--n_exp", "16", "--n_shared", "2", "--n_act", "8",
     "--aux_free", "--alpha", "0.0001", "--gamma", "0.001", "--coeff", "0.01", "--compile"],
    ["--attn", "gqa", "--n_kv_heads", "2", "--moe", "--aux_free", "--n_exp", "8", "--n_shared",
     "1", "--n_act", "2", "--alpha", "1e-4", "--gamma", "1e-3", *SMALL],
    ["--layer_configs_jsonl", str(REPO / "layer_configs.jsonl"), "--n_layer", "8", "--pos_emb",
     "rope", *SMALL],
    ["--n-layer", "4", "--n-embd", "128", "--total-batch-size-str", "8*64", "--block-size",
     "64", "--no-moe", "--act-recomp", "--save-model", "--no-aux-free", "--no_compile"],
]


@pytest.mark.parametrize("line", REFERENCE_LINES, ids=range(len(REFERENCE_LINES)))
def test_reference_style_command_lines(line):
    result = invoke("validate-config", *line)
    assert result.exit_code == 0, result.output
    assert "config OK" in result.output


def test_dashed_and_underscored_spellings_are_one_flag():
    a = invoke("validate-config", "--json", "--n-layer", "3", "--aux-free", "--no-eval", *SMALL)
    b = invoke("validate-config", "--json", "--n_layer", "3", "--aux_free", "--no_eval", *SMALL)
    assert a.exit_code == 0, a.output
    data = json.loads(a.output)
    data["train"]["wandb_run_name"] = json.loads(b.output)["train"]["wandb_run_name"]
    assert data == json.loads(b.output)
    assert data["model"]["n_layer"] == 3 and data["layers"][0]["aux_free"] is True


def test_flags_reach_the_config():
    result = invoke("validate-config", "--json", *REFERENCE_LINES[0])
    data = json.loads(result.output)
    assert data["train"]["total_batch_size"] == 2048 and data["train"]["act_recomp"] is True
    assert data["layers"][0]["attn"] == "mla" and data["layers"][0]["aux_free"] is True
    assert len(data["layers"]) == 5 and data["model"]["norm"] == "rms"


def test_json_output_reads_back_equal(tmp_path):
    args = ["--attn", "gqa", "--n_kv_heads", "2", "--pos_emb", "rope", "--wandb_run_name", "x",
            "--layer_configs_jsonl", str(REPO / "layer_configs.jsonl"), *SMALL]
    result = invoke("validate-config", "--json", *args)
    assert result.exit_code == 0, result.output
    (tmp_path / "resolved.json").write_text(result.output)
    again = invoke("validate-config", "--json", "--config", str(tmp_path / "resolved.json"))
    assert json.loads(again.output) == json.loads(result.output)
    assert load_config(tmp_path / "resolved.json") == load_config(
        overrides={"attn": "gqa", "n_kv_heads": "2", "pos_emb": "rope", "wandb_run_name": "x",
                   "layer_configs_jsonl": str(REPO / "layer_configs.jsonl"), "block_size": "64",
                   "total_batch_size": "128"})


def test_summary_table_for_heterogeneous_model():
    result = invoke("validate-config", str(REPO / "layer_configs.jsonl"), "--pos_emb", "rope",
                    *SMALL)
    assert result.exit_code == 0, result.output
    assert "mla" in result.output and "kv_heads=2" in result.output
    assert "grad accumulation steps" in result.output


def _bad_files(tmp: Path) -> list[tuple[str, list[str]]]:
    def f(name: str, content: str | bytes) -> str:
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    (tmp / "folder.yaml").mkdir()
    return [
        ("malformed yaml", [f("bad.yaml", "n_layer: [1, 2\nattn: mha\n")]),
        ("yaml tabs", [f("tabs.yaml", "model:\n\tn_layer: 3\n")]),
        ("malformed json", [f("bad.json", '{"n_layer": 3,,}')]),
        ("json trailing", [f("trail.json", '{"n_layer": 3} extra')]),
        ("malformed jsonl", [f("bad.jsonl", '{"attn": "mha"}\n{oops\n')]),
        ("binary file", [f("bin.yaml", b"\x00\x01\x02\xff" * 50)]),
        ("not utf8", [f("latin.yaml", "attn: m\xe9a\n".encode("latin-1"))]),
        ("empty file", [f("empty.yaml", "")]),
        ("whitespace only", [f("blank.json", "  \n\n ")]),
        ("directory", [str(tmp / "folder.yaml")]),
        ("missing path", [str(tmp / "nope.yaml")]),
        ("unsupported suffix", [f("conf.toml", "n_layer = 3")]),
        ("scalar yaml", [f("scalar.yaml", "42\n")]),
        ("wrong types", [f("types.yaml", "n_layer: six\nbatch_size: [1]\nmoe: maybe\n")]),
        ("nan", [f("nan.yaml", "learning_rate: .nan\n")]),
        ("json nan", [f("nan.json", '{"dropout": NaN}')]),
        ("inf", [f("inf.json", '{"learning_rate": 1e999}')]),
        ("huge", [f("huge.yaml", "n_embd: 1000000000000000000000000\n")]),
        ("negative", [f("neg.yaml", "n_layer: -3\nmax_iters: -1\n")]),
        ("unknown key", [f("unk.yaml", "n_heads: 8\n")]),
        ("unknown section key", [f("sect.yaml", "model:\n  learning_rate: 0.1\n")]),
        ("layer unknown key", [f("l.jsonl", '{"attn":"mha","n_head":8,"moe":false,'
                                            '"up_dim":8,"non_linearity":"relu","n_heads":2}\n')]),
        ("layer not a dict", [f("arr.json", "[1, 2, 3]")]),
        ("deep nesting", [f("deep.json", "[" * 5000 + "]" * 5000)]),
        ("yaml python tag", [f("tag.yaml", "n_layer: !!python/object/apply:os.system ['true']\n")]),
        ("yaml alias bomb", [f("bomb.yaml", "a: &a [x, x]\nb: &b [*a, *a]\nn_layer: *b\n")]),
    ]


FLAG_CASES = [
    ("bad int flag", ["--batch_size", "two"]),
    ("bad float flag", ["--learning_rate", "fast"]),
    ("bad bool value", ["--n_layer", "true"]),
    ("bad enum flag", ["--attn", "flash"]),
    ("injection", ["--total_batch_size_str", "__import__('os').system('echo pwned')"]),
    ("bad layer json", ["--layer_configs", "[{]"]),
    ("both layer flags", ["--layer_configs", "[]", "--layer_configs_jsonl", "x.jsonl"]),
    ("missing jsonl", ["--layer_configs_jsonl", "/nonexistent/layers.jsonl"]),
    ("mla without dims", ["--attn", "mla"]),
    ("moe without experts", ["--moe"]),
    ("indivisible batch", ["--total_batch_size", "1000"]),
    ("negative dropout", ["--dropout", "-0.5"]),
]


def test_bad_input_corpus_exits_2_without_traceback(tmp_path):
    cases = [(name, args) for name, args in _bad_files(tmp_path)] + FLAG_CASES
    assert len(cases) >= 30
    for name, args in cases:
        result = invoke("validate-config", *SMALL, *args)
        assert result.exit_code == 2, (name, result.output)
        assert isinstance(result.exception, SystemExit), (name, result.exception)
        assert "Traceback" not in result.output, name
        assert "error: invalid configuration" in result.output, (name, result.output)


def test_every_problem_is_listed_once():
    result = invoke("validate-config", "--n_head", "3", "--attn", "gqq", "--batch_size", "0",
                    *SMALL)
    assert result.exit_code == 2
    assert "(3 problems)" in result.output
    for key in ("model.n_head", "model.attn", "train.batch_size"):
        assert key in result.output


@pytest.mark.slow
def test_real_process_bad_input_has_no_traceback(tmp_path):
    (tmp_path / "bad.yaml").write_text("n_layer: [oops\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args in (["validate-config", str(tmp_path / "bad.yaml")],
                 ["validate-config", "--total_batch_size_str", "__import__('os')"],
                 ["validate-config", str(tmp_path)]):
        out = subprocess.run([sys.executable, "-m", "llmctl", *args], capture_output=True,
                             text=True, env=env, timeout=60)
        assert out.returncode == 2, out
        assert "Traceback" not in out.stderr + out.stdout
        assert "error:" in out.stderr


# Every parameter of the reference (parameters.md), with a value and where it must land.
REFERENCE_PARAMETERS = {
    "dataset": ("tinystories", "train"), "total_batch_size_str": ("2**12", None),
    "batch_size": ("4", "train"), "max_iters": ("7", "train"),
    "learning_rate": ("0.001", "train"), "warmup_steps": ("3", "train"),
    "grad_clip": ("0.5", "train"), "act_recomp": (True, "train"), "compile": (True, "train"),
    "eval": (True, "train"), "eval_interval": ("9", "train"), "eval_iters": ("11", "train"),
    "save_model": (True, "train"), "ckpt_interval": ("13", "train"),
    "file_name": ("run_x", "train"), "wandb_log": (True, "train"),
    "wandb_project": ("proj", "train"), "wandb_run_name": ("name", "train"),
    "n_layer": ("3", "model"), "n_embd": ("96", "model"), "vocab_size": ("1000", "model"),
    "block_size": ("64", "model"), "dropout": ("0.1", "model"), "pos_emb": ("rope", "model"),
    "norm": ("rms", "model"), "up_dim": ("200", "layers"), "non_linearity": ("swiglu", "layers"),
    "attn": ("mla", "layers"), "n_head": ("6", "layers"), "n_kv_heads": ("2", "layers"),
    "q_latent_dim": ("32", "layers"), "kv_latent_dim": ("24", "layers"),
    "rope_head_dim": ("8", "layers"), "moe": (True, "layers"), "n_exp": ("8", "layers"),
    "n_shared": ("1", "layers"), "n_act": ("3", "layers"), "aux_free": (True, "layers"),
    "alpha": ("0.0001", "layers"), "gamma": ("0.002", "layers"), "coeff": ("0.03", "layers"),
}


def test_every_reference_parameter_is_a_flag_with_its_meaning():
    args = []
    for name, (value, _) in REFERENCE_PARAMETERS.items():
        args += [f"--{name}"] if value is True else [f"--{name}", value]
    result = invoke("validate-config", "--json", *args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["train"]["total_batch_size"] == 4096
    for name, (value, section) in REFERENCE_PARAMETERS.items():
        if section is None:
            continue
        got = data[section][0][name] if section == "layers" else data[section][name]
        assert str(got).lower() == str(value).lower() or got == pytest.approx(float(value)), name
    assert all(layer == data["layers"][0] for layer in data["layers"]) and len(data["layers"]) == 3


def test_bare_command_is_the_references_default_run():
    result = invoke("validate-config", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["model"]["block_size"] == 512 and data["train"]["total_batch_size"] == 1024
    assert {layer["attn"] for layer in data["layers"]} == {"mqa"}


def test_reference_yaml_with_nulls_validates_and_falls_through(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("n_layer: 3\nlearning_rate: 1.0e-3\nbatch_size: 4\n")
    ref = tmp_path / "reference.yaml"
    ref.write_text("block_size: 256 # seq_len\ntotal_batch_size: 1024\nn_layer: null\n"
                   "batch_size: null\nlearning_rate: null\nattn: null\naux_free: null\n"
                   "alpha: null\nn_kv_heads: null\nwandb_run_name: null\nmoe: false\n")
    result = invoke("validate-config", str(base), str(ref), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["model"]["n_layer"], data["model"]["block_size"]) == (3, 256)
    assert (data["train"]["batch_size"], data["train"]["learning_rate"]) == (4, 1e-3)
    assert data["layers"][0]["attn"] == "mqa" and data["layers"][0]["aux_free"] is False
