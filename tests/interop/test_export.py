"""llmctl export: every family's exported model gives llmctl's logits and greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmctl.cli import app

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
ROPE = {"pos_emb": "rope", "norm": "rms", "non_linearity": "swiglu"}
MLA = {**ROPE, "attn": "mla", "q_latent_dim": 16, "kv_latent_dim": 12, "rope_head_dim": 4}
MOE = {"moe": True, "n_exp": 5, "n_shared": 1, "n_act": 3}


def _scaled_layer_configs() -> str:
    """The repository's heterogeneous layer_configs.jsonl (MLA+aux-free MoE / GQA+SwiGLU),
    scaled down to a few thousand parameters."""
    layers = [json.loads(line) for line in
              (REPO / "layer_configs.jsonl").read_text().splitlines()[:2] if line.strip()]
    for layer in layers:
        layer.update(n_head=4, q_latent_dim=16, kv_latent_dim=8, rope_head_dim=4,
                     up_dim=24 if layer["moe"] else 48)
        if layer["n_kv_heads"]:
            layer["n_kv_heads"] = 2
        if layer["moe"]:
            layer.update(n_exp=4, n_act=2)
    return json.dumps(layers)


CASES = {
    "gpt2": ({}, "GPT2LMHeadModel"),
    "gpt2_gelu_tanh": ({"non_linearity": "gelu_tanh"}, "GPT2LMHeadModel"),
    "llama_mha": ({**ROPE, "attn": "mha"}, "LlamaForCausalLM"),
    "llama_mqa": ({**ROPE, "attn": "mqa"}, "LlamaForCausalLM"),
    "llama_gqa": ({**ROPE, "attn": "gqa", "n_kv_heads": 2}, "LlamaForCausalLM"),
    "deepseek_v2_dense": (MLA, "DeepseekV2ForCausalLM"),
    "deepseek_v2_moe": ({**MLA, **MOE, "coeff": 0.01}, "DeepseekV2ForCausalLM"),
    "deepseek_v3_moe": ({**MLA, **MOE, "aux_free": True, "alpha": 1e-4, "gamma": 1e-3},
                        "DeepseekV3ForCausalLM"),
    "remote_heterogeneous": ({**ROPE, "layer_configs": _scaled_layer_configs()},
                             "LlmctlForCausalLM"),
    "remote_sinusoidal": ({"pos_emb": "sin"}, "LlmctlForCausalLM"),
}


def _export(ckpt: Path, out: Path, *args: str) -> dict:
    result = CliRunner().invoke(app, ["export", str(ckpt), str(out), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _llmctl_greedy(ckpt: Path, prompt: str, n: int) -> list[int]:
    result = CliRunner().invoke(app, [
        "sample", str(ckpt), "--prompt", prompt, "--temperature", "0", "--max_new_tokens",
        str(n), "--no_stop_at_eot", "--json", "--device", "cpu", "--seed", "0"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["samples"][0]["token_ids"]


@pytest.mark.parametrize("case", list(CASES))
def test_exported_logits_and_greedy_tokens_match_llmctl(case, checkpoint, tmp_path):
    from llmctl.runtime.checkpoint import load_model

    overrides, architecture = CASES[case]
    ckpt = checkpoint(overrides, vocab_pad=5)  # padded rows must not leak into the export
    report = _export(ckpt, tmp_path / "hf")
    assert report["architecture"] == architecture
    assert report["dropped_rows"] == 5
    out = Path(report["path"])
    assert {"config.json", "model.safetensors", "generation_config.json",
            "tokenizer.json"} <= {p.name for p in out.iterdir()}

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(hf).__name__ == architecture
    llm, _ = load_model(ckpt)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, report["vocab_size"], (2, 24), generator=gen)
    with torch.no_grad():
        ours = llm(idx, use_cache=False).logits  # (B, T, V + 5)
        theirs = hf(idx).logits  # (B, T, V)
    assert theirs.shape[-1] == report["vocab_size"]
    torch.testing.assert_close(theirs, ours[..., :report["vocab_size"]], atol=1e-4, rtol=0)

    prompt, n = "To be, or not", 12
    tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        # no end-of-text stop on either side (llmctl: --no_stop_at_eot)
        settings = transformers.GenerationConfig(max_new_tokens=n, do_sample=False,
                                                 eos_token_id=[], pad_token_id=0)
        generated = hf.generate(ids, generation_config=settings)
    assert generated[0, ids.shape[1]:].tolist() == _llmctl_greedy(ckpt, prompt, n)


def test_auto_falls_back_to_remote_and_native_refuses_with_reasons(checkpoint, tmp_path):
    ckpt = checkpoint({"pos_emb": "sin", "norm": "rms"})
    result = CliRunner().invoke(app, ["export", str(ckpt), str(tmp_path / "a"),
                                      "--format", "native"])
    assert result.exit_code == 2
    assert "pos_emb=sin (GPT-2 has learned positions)" in result.output
    assert "norm=rms (GPT-2 has LayerNorm)" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(app, ["export", str(ckpt), str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "LlmctlForCausalLM" in result.output and "trust_remote_code" in result.output


def test_remote_format_forced_for_a_native_model(checkpoint, tmp_path):
    report = _export(checkpoint({}), tmp_path / "hf", "--format", "remote")
    assert report["family"] == "llmctl"
    assert (tmp_path / "hf" / "modeling_llmctl.py").is_file()


def test_export_refuses_a_non_empty_folder_unless_forced(checkpoint, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["export", str(checkpoint({})), str(out)])
    assert result.exit_code == 2 and "--force" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    _export(checkpoint({}), out, "--force")
    assert not (out / "keep.txt").exists()


@pytest.mark.parametrize("where", ["afile/sub", "afile/sub/deeper", "/proc/llmctl-export"])
def test_export_to_a_path_that_cannot_be_a_folder(checkpoint, tmp_path, where):
    (tmp_path / "afile").write_text("mine")
    out = where if where.startswith("/") else str(tmp_path / where)
    result = CliRunner().invoke(app, ["export", str(checkpoint({})), out])
    assert result.exit_code == 2, result.output
    assert "could not write" in result.output or "cannot create the folder" in result.output
    assert (tmp_path / "afile").read_text() == "mine"


def test_export_bfloat16_weights(checkpoint, tmp_path):
    from safetensors import safe_open

    _export(checkpoint({}), tmp_path / "hf", "--dtype", "bfloat16")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118


def test_missing_extra_names_it(monkeypatch, checkpoint, tmp_path):
    import builtins

    real = builtins.__import__

    def no_transformers(name, *args, **kw):
        if name.split(".")[0] == "transformers":
            raise ImportError(name)
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    monkeypatch.setattr("importlib.import_module",
                        lambda name: no_transformers(name))
    result = CliRunner().invoke(app, ["export", str(checkpoint({})), str(tmp_path / "hf")])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: transformers is not installed; install the extra: "
                                     "pip install 'llmctl[hf]'")
