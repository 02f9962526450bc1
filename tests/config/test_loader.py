"""load_config: defaults, precedence, format parity, layer lists, safe arithmetic."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from llmctl.config import (
    BlockConfig,
    ConfigError,
    LLMConfig,
    LLMconfig,
    RunConfig,
    TrainConfig,
    Trainconfig,
    load_config,
)

REPO = Path(__file__).resolve().parents[2]
OK = {"block_size": 64, "total_batch_size": 128}  # a batch split that divides evenly


def test_defaults_are_the_references():
    """seed/defaults.md; llmctl differs only where the help says so (compile: auto)."""
    t, m, b = TrainConfig(), LLMConfig(), BlockConfig()
    assert (t.dataset, t.total_batch_size, t.batch_size, t.max_iters) == ("shakespeare", 1024,
                                                                          2, 500)
    assert (t.learning_rate, t.warmup_steps, t.grad_clip) == (3e-4, 100, 1.0)
    assert (t.act_recomp, t.eval, t.save_model, t.wandb_log) == (False,) * 4
    assert t.compile is None  # on for CUDA only (the reference: on for every POSIX system)
    assert (t.eval_interval, t.eval_iters, t.ckpt_interval) == (100, 100, 250)
    assert (t.file_name, t.wandb_project) == ("llm_model", "llms")
    assert t.wandb_run_name is None  # the unix time is taken when a run starts
    assert (m.n_layer, m.n_embd, m.vocab_size, m.block_size, m.dropout) == (6, 256, 50304, 512,
                                                                           0.0)
    assert (m.pos_emb, m.norm) == ("learn", "layer")
    assert (b.up_dim, b.non_linearity, b.attn, b.n_head, b.n_kv_heads, b.moe) == (
        256, "gelu", "mqa", 8, 8, False)
    assert b.kv_heads == 1  # mqa: one key/value head whatever n_kv_heads says
    for name in ("q_latent_dim", "kv_latent_dim", "rope_head_dim", "n_exp", "n_shared", "n_act",
                 "coeff", "alpha", "gamma"):
        assert getattr(b, name) is None, name
    assert b.aux_free is False
    assert len(m.layers) == 6 and m.homogeneous
    assert LLMconfig is LLMConfig and Trainconfig is TrainConfig


def test_bare_defaults_are_a_valid_run():
    run = load_config()  # 1024 tokens per step = batch_size 2 x block_size 512, one micro-step
    assert run.tokens_per_micro_step() == 1024 and run.grad_accum_steps() == 1
    assert run.model.layers[0].attn == "mqa" and run.model.layers[0].kv_heads == 1


def _write(path: Path, data) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(data))
    else:
        path.write_text(yaml.safe_dump(data))
    return path


def test_precedence_defaults_files_flags(tmp_path):
    a = _write(tmp_path / "a.yaml", {"n_layer": 5, "attn": "mha", "max_iters": 7, **OK})
    b = _write(tmp_path / "b.json", {"n_layer": 3, "learning_rate": 1e-3})
    run = load_config(a, b, overrides={"max_iters": "9", "n_embd": None})
    assert run.model.n_layer == 3  # b beats a
    assert run.train.max_iters == 9  # flags beat files
    assert run.train.learning_rate == 1e-3
    assert run.model.n_embd == 256  # a flag left at None was not typed: default stays
    assert run.train.batch_size == 2  # untouched default
    run = load_config(b, a)
    assert run.model.n_layer == 5  # order matters


FLAT = {"n_layer": 5, "n_embd": 128, "n_head": 4, "attn": "gqa", "n_kv_heads": 2,
        "pos_emb": "rope", "norm": "rms", "non_linearity": "swiglu", "up_dim": 256,
        "total_batch_size": 512, "block_size": 128, "batch_size": 2, "compile": True,
        "learning_rate": 6e-4, "max_iters": 10, "wandb_run_name": "parity"}
SECTIONED = {
    "model": {k: FLAT[k] for k in ("n_layer", "n_embd", "n_head", "attn", "n_kv_heads",
                                   "pos_emb", "norm", "non_linearity", "up_dim", "block_size")},
    "train": {k: FLAT[k] for k in ("total_batch_size", "batch_size", "compile", "learning_rate",
                                   "max_iters", "wandb_run_name")},
}


def test_format_parity_yaml_json_sections_flags(tmp_path):
    from_flags = load_config(overrides={k: str(v) for k, v in FLAT.items()})
    variants = [
        load_config(_write(tmp_path / "flat.yaml", FLAT)),
        load_config(_write(tmp_path / "flat.json", FLAT)),
        load_config(_write(tmp_path / "sect.yaml", SECTIONED)),
        load_config(_write(tmp_path / "sect.json", SECTIONED)),
        load_config(dict(FLAT)),
        load_config(overrides={**{k: str(v) for k, v in FLAT.items() if k != "total_batch_size"},
                               "total_batch_size_str": "2**9"}),
    ]
    for run in variants:
        assert run == from_flags
    assert from_flags.model.layers[0].kv_heads == 2 and from_flags.train.compile is True


LAYERS = [
    {"attn": "mla", "n_head": 4, "q_latent_dim": 32, "kv_latent_dim": 32, "rope_head_dim": 8,
     "moe": True, "up_dim": 64, "non_linearity": "swiglu", "n_exp": 8, "n_shared": 1,
     "n_act": 3, "aux_free": True, "alpha": 1e-4, "gamma": 1e-3},
    {"attn": "gqa", "n_head": 4, "n_kv_heads": 2, "q_latent_dim": 99, "moe": False,
     "up_dim": 128, "non_linearity": "gelu"},
]


def test_layer_list_parity_json_array_jsonl_string_sections(tmp_path):
    base = {"n_embd": 64, "pos_emb": "rope", **OK}
    jsonl = tmp_path / "layers.jsonl"
    jsonl.write_text("\n".join(json.dumps(layer) for layer in LAYERS) + "\n")
    array = _write(tmp_path / "layers.json", LAYERS)
    runs = [
        load_config(base, overrides={"layer_configs_jsonl": str(jsonl)}),
        load_config(base, jsonl),
        load_config(base, array),
        load_config(base, overrides={"layer_configs": json.dumps(LAYERS)}),
        load_config({**base, "layers": LAYERS}),
        load_config({"model": {**{k: v for k, v in base.items() if k != "total_batch_size"},
                               "layers": LAYERS}, "train": {"total_batch_size": 128}}),
    ]
    for run in runs[1:]:
        assert run == runs[0]
    m = runs[0].model
    assert m.n_layer == 2 and not m.homogeneous  # n_layer taken from the list
    assert m.layers[0].attn == "mla" and m.layers[0].n_routed_act == 2
    assert m.layers[1].kv_heads == 2 and m.layers[1].q_latent_dim == 99  # unused key kept, ignored


def test_layer_path_in_a_file_is_relative_to_that_file(tmp_path):
    sub = tmp_path / "cfg"
    sub.mkdir()
    (sub / "layers.jsonl").write_text("\n".join(json.dumps(x) for x in LAYERS))
    cfg = _write(sub / "run.yaml", {"n_embd": 64, "pos_emb": "rope",
                                    "layer_configs_jsonl": "layers.jsonl", **OK})
    assert load_config(cfg).model.n_layer == 2


def test_reference_layer_configs_jsonl_validates():
    run = load_config(REPO / "layer_configs.jsonl",
                      overrides={"pos_emb": "rope", "norm": "rms", **{k: str(v) for k, v in
                                                                      OK.items()}})
    kinds = [(layer.attn, layer.moe) for layer in run.model.layers]
    assert run.model.n_layer == 8
    assert kinds.count(("mla", True)) == 4 and kinds.count(("gqa", False)) == 4
    moe = next(layer for layer in run.model.layers if layer.moe)
    assert (moe.n_exp, moe.n_shared, moe.n_act, moe.aux_free) == (16, 1, 4, True)
    assert all(layer.kv_heads == 2 for layer in run.model.layers if layer.attn == "gqa")


def test_layers_inherit_unnamed_keys_from_flat_settings():
    run = load_config({"n_embd": 64, "n_kv_heads": 2, **OK,
                       "layers": [{"attn": "gqa", "n_head": 4, "moe": False, "up_dim": 32,
                                   "non_linearity": "relu"}]})
    assert run.model.layers[0].kv_heads == 2


def test_n_layer_must_match_list():
    with pytest.raises(ConfigError, match=r"model.n_layer: n_layer=3 but the layer list has 2"):
        load_config({"n_embd": 64, "pos_emb": "rope", "n_layer": 3, "layers": LAYERS, **OK})


def test_json_round_trip_of_resolved_config(tmp_path):
    run = load_config({"n_embd": 64, "pos_emb": "rope", "layers": LAYERS, **OK})
    path = tmp_path / "resolved.json"
    path.write_text(json.dumps(run.to_dict()))
    assert load_config(path) == run


def test_world_size_from_environment(monkeypatch):
    cfg = {"block_size": 64, "batch_size": 2, "total_batch_size": 384}
    assert load_config(cfg).grad_accum_steps() == 3
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"× world_size 2 = 2 × 64 × 2 = 256; nearest valid: "
                                          r"256 or 512"):
        load_config(cfg)
    assert load_config(cfg, world_size=3).grad_accum_steps(3) == 1


def test_check_batch_split_can_be_skipped():
    uneven = {"block_size": 1024}  # 2 x 1024 tokens per micro-step > 1024 per step
    run = load_config(uneven, check_batch_split=False)
    assert run.train.total_batch_size == 1024
    with pytest.raises(ConfigError, match="nearest valid: 2048"):
        load_config(uneven)


@pytest.mark.parametrize("text,value", [("2**11", 2048), ("8*1024", 8192), ("(4+4)*256", 2048),
                                        ("4096//2", 2048), (" 512 ", 512), ("-(-64)", 64)])
def test_total_batch_size_str_arithmetic(text, value):
    run = load_config(overrides={"total_batch_size_str": text, "block_size": "1",
                                 "batch_size": "1"})
    assert run.train.total_batch_size == value


@pytest.mark.parametrize("text", ["__import__('os').system('true')", "open('x')", "2**64**64",
                                  "1/2", "2.5*4", "a*2", "[1,2]", "lambda: 1", "9" * 200,
                                  "2**", "os.getcwd()", "1 if 1 else 2", "(1).__class__"])
def test_total_batch_size_str_never_executes(text):
    with pytest.raises(ConfigError, match="train.total_batch_size"):
        load_config(overrides={"total_batch_size_str": text})


def test_flag_strings_are_coerced_like_file_values():
    run = load_config(overrides={"moe": True, "n_exp": "8", "n_shared": "1", "n_act": "2",
                                 "coeff": "1e-2", "dropout": "0.1", "attn": "GQA",
                                 "n_kv_heads": "4", **{k: str(v) for k, v in OK.items()}})
    block = run.model.layers[0]
    assert (block.n_exp, block.coeff, block.attn, run.model.dropout) == (8, 0.01, "gqa", 0.1)


def test_dataclasses_are_independent_per_layer():
    run = load_config(OK)
    assert run.model.layers[0] == run.model.layers[1]
    assert run.model.layers[0] is not run.model.layers[1]
    assert isinstance(run, RunConfig) and dataclasses.is_dataclass(run.model.layers[0])


# ---------------------------------------------------------------- null means "not set"

# Shaped like the reference's own YAML configs: every key written, `null` where unset.
REFERENCE_DENSE_YAML = """\
# model
vocab_size: 50304
block_size: 256 # seq_len
n_embd: 128
pos_emb: rope
dropout: null
n_layer: 4
norm: null
up_dim: 512
non_linearity: swiglu
attn: gqa
n_head: 8
n_kv_heads: 2
q_latent_dim: null
kv_latent_dim: null
rope_head_dim: null
moe: false
n_exp: null
n_shared: null
n_act: null
coeff: null
aux_free: null
alpha: null
gamma: null
# training
dataset: shakespeare
total_batch_size: 512
batch_size: 2
max_iters: 50
eval: null
eval_interval: null
eval_iters: null
learning_rate: null
warmup_steps: null
grad_clip: null
save_model: null
ckpt_interval: null
file_name: null
act_recomp: null
wandb_log: null
wandb_project: null
wandb_run_name: null
"""

REFERENCE_MOE_YAML = """\
model:
  block_size: 256 # seq_len
  n_embd: 128
  attn: mla
  n_kv_heads: null
  q_latent_dim: 32
  kv_latent_dim: 32
  rope_head_dim: null
  moe: true
  n_exp: 8
  n_shared: 1
  n_act: 3
  coeff: null
  aux_free: true
  alpha: 0.0001
  gamma: 0.001
  up_dim: null
train:
  total_batch_size: 512
  batch_size: null
  compile: null
  wandb_run_name: null
layers:
  - {attn: mla, n_head: 4, n_kv_heads: null, q_latent_dim: 16, kv_latent_dim: 16,
     rope_head_dim: null, moe: true, up_dim: 64, non_linearity: gelu, coeff: null,
     aux_free: null, alpha: null, gamma: null}
  - {attn: gqa, n_head: 4, n_kv_heads: 2, q_latent_dim: null, kv_latent_dim: null,
     moe: false, up_dim: 64, non_linearity: swiglu, n_exp: null, n_shared: null,
     n_act: null, aux_free: null}
"""


def test_reference_style_yaml_with_nulls_loads(tmp_path):
    path = tmp_path / "reference.yaml"
    path.write_text(REFERENCE_DENSE_YAML)
    run = load_config(path)
    m, b, t = run.model, run.model.layers[0], run.train
    assert (m.block_size, m.n_embd, m.n_layer, m.pos_emb) == (256, 128, 4, "rope")
    assert (m.dropout, m.norm) == (0.0, "layer")  # null: the defaults
    assert (b.attn, b.kv_heads, b.up_dim, b.non_linearity, b.aux_free) == (
        "gqa", 2, 512, "swiglu", False)
    assert (t.total_batch_size, t.batch_size, t.max_iters) == (512, 2, 50)
    defaults = TrainConfig()
    for name in ("eval", "eval_interval", "eval_iters", "learning_rate", "warmup_steps",
                 "grad_clip", "save_model", "ckpt_interval", "file_name", "act_recomp",
                 "wandb_log", "wandb_project", "wandb_run_name"):
        assert getattr(t, name) == getattr(defaults, name), name
    # JSON files with null read the same
    as_json = _write(tmp_path / "reference.json", yaml.safe_load(REFERENCE_DENSE_YAML))
    assert load_config(as_json) == run


def test_reference_style_sections_and_layer_nulls(tmp_path):
    path = tmp_path / "moe.yaml"
    path.write_text(REFERENCE_MOE_YAML)
    run = load_config(path)
    first, second = run.model.layers
    assert run.model.n_layer == 2 and run.train.batch_size == 2
    # layer nulls fall through to the flat model: settings (aux_free, alpha, gamma)
    assert (first.attn, first.q_latent_dim, first.aux_free, first.alpha, first.gamma) == (
        "mla", 16, True, 1e-4, 1e-3)
    assert (first.n_exp, first.n_shared, first.n_act) == (8, 1, 3)
    assert (second.attn, second.kv_heads, second.moe, second.n_exp) == ("gqa", 2, False, 8)
    # the same layers as JSONL and as a --layer_configs string
    layers = yaml.safe_load(REFERENCE_MOE_YAML)["layers"]
    jsonl = tmp_path / "layers.jsonl"
    jsonl.write_text("\n".join(json.dumps(layer) for layer in layers) + "\n")
    flat = {k: v for k, v in yaml.safe_load(REFERENCE_MOE_YAML)["model"].items()}
    sources = {**flat, "total_batch_size": 512}
    assert load_config(sources, jsonl).model.layers == run.model.layers
    assert load_config(sources, overrides={"layer_configs": json.dumps(layers)}
                       ).model.layers == run.model.layers


def test_null_falls_through_to_an_earlier_file(tmp_path):
    base = _write(tmp_path / "base.yaml", {
        "block_size": 128, "total_batch_size": 1024, "batch_size": 4, "learning_rate": 1e-3,
        "attn": "gqa", "n_kv_heads": 4, "min_lr": 1e-5, "wandb_run_name": "base",
        "layers": [{"attn": "gqa", "n_head": 8, "n_kv_heads": 2, "moe": False, "up_dim": 64,
                    "non_linearity": "gelu"}]})
    later = tmp_path / "later.yaml"
    later.write_text("block_size: 256 # seq_len\nbatch_size: null\nlearning_rate: ~\n"
                     "n_kv_heads:\nmin_lr: null\nwandb_run_name: null\nlayers: null\n"
                     "model: null\ntrain:\n  max_iters: null\n  total_batch_size: 2048\n")
    run = load_config(base, later)
    t = run.train
    assert run.model.block_size == 256 and t.total_batch_size == 2048  # set keys win
    assert (t.batch_size, t.learning_rate, t.min_lr, t.wandb_run_name) == (4, 1e-3, 1e-5,
                                                                           "base")
    assert t.max_iters == 500  # null over nothing: the default
    assert len(run.model.layers) == 1 and run.model.layers[0].kv_heads == 2  # base's list
    # a null is exactly an absent key
    absent = _write(tmp_path / "absent.yaml", {"block_size": 256, "train":
                                               {"total_batch_size": 2048}})
    assert load_config(base, absent) == run


def test_null_does_not_loosen_types_or_key_names(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("aux_free: 'null'\nmoe: 3\nblock_sise: null\nmodel: {n_layre: null}\n"
                    "layers:\n  - {attn: null, n_head: 4, moe: false, up_dim: 64,"
                    " non_linearity: gelu, bogus: null}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "model.aux_free: expected true or false, got 'null'" in text
    assert "model.moe: expected true or false, got 3" in text
    assert "block_sise: unknown parameter (did you mean 'block_size'?)" in text
    assert "model.n_layre: unknown key" in text
    assert "layers[0]: missing required key(s) attn" in text
    assert "layers[0].bogus: unknown layer key" in text
