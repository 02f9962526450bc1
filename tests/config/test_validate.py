"""One case per validation rule: the dotted key, the value and the rule are all named."""

from __future__ import annotations

import pytest

from llmctl.config import ConfigError, load_config

OK = {"block_size": 64, "total_batch_size": 128}
MOE = {"moe": True, "n_exp": 8, "n_shared": 1, "n_act": 3, "coeff": 0.01}
MLA = {"attn": "mla", "q_latent_dim": 32, "kv_latent_dim": 32}


def _layer(**kw):
    return {"attn": "mha", "n_head": 4, "moe": False, "up_dim": 64, "non_linearity": "gelu", **kw}


CASES = [
    # (settings, dotted key, fragment of the message)
    ({"attn": "gqq"}, "model.attn", "'gqq' is not one of mha, mqa, gqa, mla (did you mean 'gqa'?)"),
    ({"pos_emb": "xpos"}, "model.pos_emb", "'xpos' is not one of learn, sin, rope, alibi"),
    ({"norm": "batch"}, "model.norm", "'batch' is not one of layer, rms"),
    ({"non_linearity": "swigly"}, "model.non_linearity", "(did you mean 'swiglu'?)"),
    ({"dtype": "fp8"}, "train.dtype", "'fp8' is not one of auto, float32, bfloat16, float16"),
    ({"device": "tpu"}, "train.device", "'tpu' is not one of auto, cpu, cuda, cuda:N, mps"),
    ({"n_layer": 0}, "model.n_layer", "must be >= 1, got 0"),
    ({"n_embd": -8}, "model.n_embd", "must be >= 1, got -8"),
    ({"vocab_size": 0}, "model.vocab_size", "must be >= 1, got 0"),
    ({"block_size": 0, "total_batch_size": 128}, "model.block_size", "must be >= 1, got 0"),
    ({"up_dim": 0}, "model.up_dim", "must be >= 1, got 0"),
    ({"n_embd": 2**21, "n_head": 8}, "model.n_embd", "must be <= 1048576"),
    ({"dropout": 1.0}, "model.dropout", "must be in [0.0, 1.0), got 1.0"),
    ({"n_head": 3}, "model.n_head", "n_embd=256 must be divisible by n_head=3"),
    ({"pos_emb": "rope", "n_embd": 24, "n_head": 8}, "model.n_head",
     "head dim n_embd/n_head = 3 must be even for pos_emb=rope"),
    ({"attn": "gqa", "n_kv_heads": 3}, "model.n_kv_heads",
     "n_head=8 must be divisible by n_kv_heads=3"),
    # (a YAML null means "not set"; the string 'none' clears the value)
    ({"attn": "gqa", "n_kv_heads": "none"}, "model.n_kv_heads", "gqa needs n_kv_heads"),
    ({"attn": "gqa", "n_kv_heads": 0}, "model.n_kv_heads", "must be >= 1, got 0"),
    ({"attn": "mla", "kv_latent_dim": 32}, "model.q_latent_dim", "mla needs q_latent_dim"),
    ({"attn": "mla", "q_latent_dim": 32}, "model.kv_latent_dim", "mla needs kv_latent_dim"),
    ({**MLA, "pos_emb": "rope"}, "model.rope_head_dim",
     "mla with pos_emb=rope needs rope_head_dim"),
    ({**MLA, "pos_emb": "rope", "rope_head_dim": 7}, "model.rope_head_dim",
     "must be even for RoPE, got 7"),
    ({**MLA, "latent_norm_eps": 0}, "model.latent_norm_eps", "must be in (0, 0.1], got 0"),
    ({**MLA, "latent_norm_eps": 0.5}, "model.latent_norm_eps", "must be in (0, 0.1], got 0.5"),
    ({"moe": True, "n_shared": 1, "n_act": 2, "coeff": 0.1}, "model.n_exp", "moe needs n_exp"),
    ({**MOE, "n_exp": 0}, "model.n_exp", "must be >= 1, got 0"),
    ({**MOE, "n_shared": -1}, "model.n_shared", "must be >= 0, got -1"),
    ({**MOE, "n_act": 1}, "model.n_act", "need n_shared < n_act, got n_shared=1, n_act=1"),
    ({**MOE, "n_act": 9}, "model.n_act", "need n_act <= n_exp, got n_act=9, n_exp=8"),
    ({**MOE, "n_shared": None, "n_act": 9}, "model.n_act", "need n_act <= n_exp"),
    ({**MOE, "coeff": None}, "model.coeff", "moe without aux_free needs coeff"),
    ({**MOE, "coeff": -1.0}, "model.coeff", "must be >= 0, got -1.0"),
    ({**MOE, "aux_free": True, "gamma": 0.001}, "model.alpha", "aux_free needs alpha"),
    ({**MOE, "aux_free": True, "alpha": 0.001}, "model.gamma", "aux_free needs gamma"),
    ({"batch_size": 0}, "train.batch_size", "must be >= 1, got 0"),
    ({"max_iters": 0}, "train.max_iters", "must be >= 1, got 0"),
    ({"warmup_steps": -1}, "train.warmup_steps", "must be >= 0, got -1"),
    ({"seed": -1}, "train.seed", "must be >= 0, got -1"),
    ({"device": "cuda:99999999999999"}, "train.device", "is not one of auto, cpu, cuda"),
    ({"seed": 2**32}, "train.seed", "must be <= 4294967295, got 4294967296"),
    ({"learning_rate": 0}, "train.learning_rate", "must be > 0, got 0"),
    ({"min_lr": 1.0}, "train.min_lr", "must be in [0, learning_rate=0.0003], got 1.0"),
    ({"weight_decay": -0.1}, "train.weight_decay", "must be >= 0"),
    ({"beta2": 1.0}, "train.beta2", "must be in [0.0, 1.0), got 1.0"),
    ({"grad_clip": -1}, "train.grad_clip", "must be >= 0 (0 disables clipping), got -1"),
    ({"eval_interval": 0}, "train.eval_interval", "must be >= 1, got 0"),
    ({"eval_iters": 0}, "train.eval_iters", "must be >= 1, got 0"),
    ({"ckpt_interval": 0}, "train.ckpt_interval", "must be >= 1, got 0"),
    ({"log_interval": 0}, "train.log_interval", "must be >= 1, got 0"),
    ({"peak_flops": -1}, "train.peak_flops", "must be > 0"),
    ({"file_name": "../escape"}, "train.file_name", "must be a plain name"),
    ({"dataset": "a/b"}, "train.dataset", "must be a plain name"),
    ({"wandb_log": True, "wandb_project": " "}, "train.wandb_project", "must not be empty"),
    ({"total_batch_size": 100}, "train.total_batch_size",
     "100 must be a multiple of batch_size × block_size = 2 × 64 = 128; nearest valid: 128"),
    ({"total_batch_size": 300}, "train.total_batch_size", "nearest valid: 256 or 384"),
    ({"total_batch_size": 0}, "train.total_batch_size", "must be >= 1, got 0"),
    ({"batch_size": "two"}, "train.batch_size", "expected an integer, got 'two'"),
    ({"n_layer": 2.5}, "model.n_layer", "expected an integer, got 2.5"),
    ({"learning_rate": "fast"}, "train.learning_rate", "expected a number, got 'fast'"),
    ({"learning_rate": float("nan")}, "train.learning_rate", "expected a finite number, got nan"),
    ({"moe": "maybe"}, "model.moe", "expected true or false, got 'maybe'"),
    ({"attn": 5}, "model.attn", "'5' is not one of"),
    ({"n_embd": [1, 2]}, "model.n_embd", "expected an integer, got [1, 2]"),
    ({"n_layer": 10**30}, "model.n_layer", "is too large"),
    ({"n_heads": 8}, "n_heads", "unknown parameter (did you mean 'n_head'?); valid keys: "),
    ({"model": {"max_iters": 3}}, "model.max_iters", "it belongs in the 'train' section"),
    ({"train": {"n_layer": 3}}, "train.n_layer", "it belongs in the 'model' section"),
    ({"layers": [_layer(n_heads=4)]}, "layers[0].n_heads",
     "unknown layer key (did you mean 'n_head'?)"),
    ({"layers": [{"attn": "mha", "n_head": 4}]}, "layers[0]",
     "missing required key(s) moe, up_dim, non_linearity"),
    ({"layers": [_layer(), _layer(attn="gqa", n_kv_heads=3)]}, "layers[1].n_kv_heads",
     "n_head=4 must be divisible by n_kv_heads=3"),
    ({"layers": [_layer(), "mha"]}, "layers[1]", "expected a dict of block settings, got str"),
    ({"layers": []}, "model.layers", "the layer list is empty"),
    ({"layers": [_layer()], "layer_configs": [_layer()]}, "model.layers",
     "give only one layer list"),
    ({"layer_configs": "{not json"}, "model.layer_configs", "invalid JSON"),
    ({"layer_configs": 5}, "model.layer_configs", "expected a list of layer dicts, got int"),
    ({"n_layer": 2, "layers": [_layer()]}, "model.n_layer",
     "n_layer=2 but the layer list has 1 entries"),
]


@pytest.mark.parametrize("settings,key,fragment", CASES, ids=[c[1] + ":" + c[2][:30]
                                                               for c in CASES])
def test_rule(settings, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config({**OK, **settings})
    lines = [str(p) for p in info.value.problems]
    assert any(line.startswith(key + ":") and fragment in line for line in lines), lines


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config({"n_layer": 0, "attn": "xyz", "batch_size": "two", "max_iters": -5})
    keys = [p.key for p in info.value.problems]
    for key in ("model.n_layer", "model.attn", "train.batch_size", "train.max_iters"):
        assert key in keys
    assert str(info.value).startswith("invalid configuration (")


def test_problem_names_its_origin(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("n_head: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg, OK)
    assert f"(from {cfg})" in str(info.value)


def test_flags_with_both_layer_options_refused(tmp_path):
    jsonl = tmp_path / "l.jsonl"
    jsonl.write_text('{"attn": "mha", "n_head": 4, "moe": false, "up_dim": 8, '
                     '"non_linearity": "relu"}\n')
    with pytest.raises(ConfigError, match="give only one of --layer_configs and "
                                          "--layer_configs_jsonl"):
        load_config(OK, overrides={"layer_configs": "[]", "layer_configs_jsonl": str(jsonl)})


def test_unused_keys_of_other_kinds_are_not_validated():
    # a gqa layer with a nonsensical q_latent_dim: ignored, as in the reference's JSONL
    run = load_config({**OK, "layers": [_layer(attn="gqa", n_kv_heads=2, q_latent_dim=-5)]})
    assert run.model.layers[0].kv_heads == 2


def test_batch_split_alone_for_a_world_size_known_at_launch() -> None:
    from llmctl.config import load_config
    from llmctl.config.validate import batch_split_problems

    run = load_config(overrides={"batch_size": 2, "block_size": 64, "total_batch_size": 256})
    assert batch_split_problems(run, 1) == [] and batch_split_problems(run, 2) == []
    (problem,) = batch_split_problems(run, 3)
    assert problem.key == "train.total_batch_size"
    assert "× world_size 3" in problem.message and "nearest valid: 384" in problem.message
