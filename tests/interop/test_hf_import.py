"""hf:PATH import: llmctl exports come back exactly; models saved by transformers itself
import and match their own logits; what llmctl cannot represent is refused with the reason."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmctl.cli import app

transformers = pytest.importorskip("transformers")

from .conftest import CHARS  # noqa: E402
from .test_export import CASES  # noqa: E402

ROUND_TRIP = ["gpt2", "llama_gqa", "deepseek_v2_dense", "deepseek_v2_moe", "deepseek_v3_moe",
              "remote_heterogeneous"]
HF_EPS = {"latent_norm_eps": 1e-6}  # transformers' DeepSeek latent-norm eps: no rescaling
EXACT_DEEPSEEK = {"deepseek_v2_dense_eps6": {**CASES["deepseek_v2_dense"][0], **HF_EPS},
                  "deepseek_v2_moe_eps6": {**CASES["deepseek_v2_moe"][0], **HF_EPS},
                  "deepseek_v3_moe_eps6": {**CASES["deepseek_v3_moe"][0], **HF_EPS}}


def _architecture(layer) -> dict:
    """What shapes the forward pass (training-only MoE coefficients are not in config.json)."""
    d = {k: v for k, v in vars(layer).items() if k not in ("n_kv_heads", "coeff", "alpha",
                                                            "gamma")}
    return {**d, "kv_heads": layer.kv_heads}


def _logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx, use_cache=False).logits


@pytest.mark.parametrize("case", ROUND_TRIP + list(EXACT_DEEPSEEK))
def test_export_then_import_gives_the_original_logits(case, checkpoint, tmp_path):
    from llmctl.interop.hf_export import export_checkpoint
    from llmctl.interop.hf_import import load_hf
    from llmctl.model import LLM
    from llmctl.runtime.checkpoint import load_model

    ckpt = checkpoint(EXACT_DEEPSEEK.get(case) or CASES[case][0], vocab_pad=3)
    export_checkpoint(ckpt, tmp_path / "hf")
    imported = load_hf(f"hf:{tmp_path / 'hf'}")
    original, info = load_model(ckpt)
    assert imported.tokenizer_spec == info.tokenizer  # the exact llmctl tokenizer comes back
    assert imported.config.vocab_size == original.config.vocab_size - 3
    assert [_architecture(x) for x in imported.config.layers] == \
        [_architecture(x) for x in original.config.layers]  # latent_norm_eps included
    model = LLM(imported.config).eval()
    model.load_state_dict(imported.state_dict, strict=True)
    # Weights come back bitwise, also for a DeepSeek model with llmctl's default latent-norm
    # eps 1e-5 (its two latent projections are exported scaled by sqrt(0.1) for transformers'
    # eps 1e-6, and import takes the unscaled originals exported beside them).
    V = imported.config.vocab_size
    for name, want in original.state_dict().items():
        want = want[:V] if name in ("wte.weight", "lm_head.weight") else want
        assert torch.equal(imported.state_dict[name], want), name
    idx = torch.randint(0, V, (2, 20))
    assert torch.equal(_logits(model, idx), _logits(original, idx)[..., :V])


def test_a_deepseek_changed_after_export_imports_its_new_weights(checkpoint, tmp_path):
    """The exported originals of the rescaled latent projections are used only while the
    folder's weights are exactly their scaled copies: weights changed on the transformers
    side (fine-tuned there) are scaled back instead, never replaced by the stale originals."""
    from safetensors.torch import load_file, save_file

    from llmctl.interop.adapter import EXACT_FILE
    from llmctl.interop.deepseek import latent_scale
    from llmctl.interop.hf_export import export_checkpoint
    from llmctl.interop.hf_import import load_hf

    ckpt = checkpoint(CASES["deepseek_v2_moe"][0], vocab_pad=3)
    export_checkpoint(ckpt, tmp_path / "hf")
    assert (tmp_path / "hf" / EXACT_FILE).is_file()  # only for the rescaled eps
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    key = "model.layers.0.self_attn.q_a_proj.weight"
    weights[key] = weights[key] + 0.25
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    imported = load_hf(f"hf:{tmp_path / 'hf'}")
    scale = latent_scale(imported.config.layers[0].latent_norm_eps)
    torch.testing.assert_close(imported.state_dict["blocks.0.attn.q_down.weight"],
                               weights[key] / scale, rtol=0, atol=0)
    unchanged = load_file(tmp_path / "hf" / EXACT_FILE)["blocks.1.attn.q_down.weight"]
    assert torch.equal(imported.state_dict["blocks.1.attn.q_down.weight"], unchanged)


def _char_tokenizer(folder: Path) -> None:
    from llmctl.data.tokenizers import CharTokenizer
    from llmctl.interop.tokenizer import hf_tokenizer

    hf_tokenizer(CharTokenizer(CHARS)).save_pretrained(folder)


V = len(CHARS) + 1
HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=48,
        activation_function="gelu_new", layer_norm_epsilon=1e-5),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        rms_norm_eps=1e-5, tie_word_embeddings=True),
    "deepseek_v2": lambda: transformers.DeepseekV2Config(
        vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16,
        kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, n_group=1, topk_group=1, topk_method="greedy",
        max_position_embeddings=32, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16,
        kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, n_group=1, topk_group=1, max_position_embeddings=32,
        rms_norm_eps=1e-5, tie_word_embeddings=True, routed_scaling_factor=1.0),
}


@pytest.mark.parametrize("family", list(HF_CONFIGS))
def test_a_model_saved_by_transformers_imports_and_matches_its_logits(family, tmp_path):
    from llmctl.interop.hf_import import load_hf_checkpoint

    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[family]()).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if not name.endswith("bias"):  # llmctl has no linear biases: keep GPT-2's zero
                p.normal_(0, 0.2) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.randn_like(buf))
    hf.save_pretrained(tmp_path / "hf")
    _char_tokenizer(tmp_path / "hf")
    loaded = load_hf_checkpoint(f"hf:{tmp_path / 'hf'}", device="cpu")
    assert loaded.info.raw["hf_family"] == family
    idx = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        theirs = hf(idx).logits
    torch.testing.assert_close(_logits(loaded.model, idx), theirs, atol=1e-4, rtol=0)
    assert loaded.tokenizer.encode("To be") == \
        transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").encode("To be")


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_a_transformers_deepseek_imports_bitwise(family, tmp_path):
    """Import sets latent_norm_eps = 1e-6 (transformers' hard-coded value), so the weights
    are transformers' own, unscaled: mapping them back gives its state dict bitwise."""
    from llmctl.interop.hf_export import hf_state_dict
    from llmctl.interop.hf_import import ADAPTERS, load_hf

    config = HF_CONFIGS[family]()
    if family == "deepseek_v3":  # exports rotate halves: an interleaved V3 comes back permuted
        config.rope_interleave = False
    folder = _save_hf(config, tmp_path / "hf")
    imported = load_hf(f"hf:{folder}")
    assert {layer.latent_norm_eps for layer in imported.config.layers} == {1e-6}
    back = hf_state_dict(imported.state_dict, imported.config, ADAPTERS[family], V)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert back.keys() <= theirs.keys()
    assert all(torch.equal(back[k], theirs[k]) for k in back), \
        [k for k in back if not torch.equal(back[k], theirs[k])]


def _save_hf(config, folder: Path) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    _char_tokenizer(folder)
    return folder


def _refusal(folder: Path) -> str:
    result = CliRunner().invoke(app, ["sample", f"hf:{folder}", "--max_new_tokens", "2",
                                      "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


def test_gpt2_with_biases_is_refused(tmp_path):
    folder = _save_hf(HF_CONFIGS["gpt2"](), tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "model.safetensors")
    sd["transformer.h.0.attn.c_attn.bias"] += 0.1
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    assert "transformer.h.0.attn.c_attn.bias is not zero" in _refusal(folder) or \
        "h.0.attn.c_attn.bias is not zero" in _refusal(folder)


WRONG_WEIGHTS = {  # a weight of the wrong rank / size / dtype -> the refusal names the fit
    "3-d projection": ("gpt2", "transformer.h.0.attn.c_attn.weight",
                       lambda t: torch.zeros(2, *t.shape), "RuntimeError"),
    "1-d q_proj": ("llama", "model.layers.0.self_attn.q_proj.weight",
                   lambda t: torch.zeros(t.numel()), "RuntimeError"),
}


@pytest.mark.parametrize("case", list(WRONG_WEIGHTS))
def test_a_weight_of_the_wrong_rank_or_dtype_is_refused(case, tmp_path):
    from safetensors.torch import load_file, save_file

    family, name, edit, kind = WRONG_WEIGHTS[case]
    folder = _save_hf(HF_CONFIGS[family](), tmp_path / "hf")
    sd = load_file(folder / "model.safetensors")
    sd[name] = edit(sd[name])
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    assert f"the weights do not fit a {family} model of this config ({kind}" in _refusal(folder)


def test_a_shard_that_is_a_fifo_or_far_too_large_is_not_read(tmp_path):
    """Headers first: a FIFO shard hung the import; a 4 GB stray tensor was read whole."""
    from safetensors import safe_open

    folder = _save_hf(HF_CONFIGS["llama"](), tmp_path / "hf")
    (folder / "model.safetensors").rename(folder / "s1.safetensors")
    with safe_open(str(folder / "s1.safetensors"), "pt") as f:
        names = list(f.keys())  # noqa: SIM118
    weight_map = {name: "s1.safetensors" for name in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {**weight_map, names[0]: "s2.safetensors"}}))
    os.mkfifo(folder / "s2.safetensors")
    assert "s2.safetensors is a FIFO (named pipe), not a regular file" in _refusal(folder)
    (folder / "s2.safetensors").unlink()
    header = json.dumps({"junk": {"dtype": "F32", "shape": [10**9],
                                  "data_offsets": [0, 4 * 10**9]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(folder / "s2.safetensors", "wb") as f:  # sparse: costs no disk
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 4 * 10**9)
    assert "hold 1,000,0" in _refusal(folder)


@pytest.mark.parametrize("bias, reason", [
    (lambda t: torch.full_like(t, float("nan")), "c_attn.bias is not zero"),
    (lambda t: torch.zeros(0), "c_attn.bias is empty"),
    (lambda t: torch.ones(t.shape, dtype=torch.bool), "c_attn.bias is not zero"),
])
def test_a_gpt2_bias_that_is_not_plainly_zero_is_refused(bias, reason, tmp_path):
    """A NaN bias passed the old max(|b|) > 0 test and was dropped without a word."""
    from safetensors.torch import load_file, save_file

    folder = _save_hf(HF_CONFIGS["gpt2"](), tmp_path / "hf")
    sd = load_file(folder / "model.safetensors")
    name = "transformer.h.0.attn.c_attn.bias"
    sd[name] = bias(sd[name])
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    assert reason in _refusal(folder)


def test_untied_llama_and_scaled_rope_are_refused(tmp_path):
    config = HF_CONFIGS["llama"]()
    config.tie_word_embeddings = False
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    out = _refusal(_save_hf(config, tmp_path / "hf"))
    assert "RoPE scaling 'linear'" in out or "untied" in out


def test_unknown_model_type_and_pickles_are_refused(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    assert "model type 'mamba' is not in llmctl's architecture space" in _refusal(folder)
    (folder / "config.json").write_text(json.dumps(HF_CONFIGS["llama"]().to_dict()))
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    assert "is a pickle, which llmctl never loads" in _refusal(folder)
    assert "not a transformers folder" in _refusal(tmp_path / "nowhere")


GPT2_CONFIG = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2,
               "vocab_size": 64, "n_positions": 16}
BAD_CONFIGS = {  # config.json -> what the refusal says (checked as data before any work)
    "{not json": "is not valid JSON",
    "[1, 2]": "is not a JSON object",
    json.dumps({"model_type": ["gpt2"]}): "model type ['gpt2'] is not in llmctl's",
    json.dumps({**GPT2_CONFIG, "n_layer": 1e300}): "n_layer=1e+300 (a layer count is",
    json.dumps({"model_type": "deepseek_v3", "num_hidden_layers": 2,
                "first_k_dense_replace": 10**8}): "first_k_dense_replace=100000000",
    json.dumps({"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 32}):
        "this llama config has no 'num_attention_heads' field",
    json.dumps({**GPT2_CONFIG, "layer_norm_epsilon": "small"}): "wrong type or value",
    json.dumps({**GPT2_CONFIG, "n_embd": "wide"}): "wrong type or value",
    json.dumps({**GPT2_CONFIG, "llmctl_source_step": "7"}): "llmctl_source_step must be",
}


@pytest.mark.parametrize("text", list(BAD_CONFIGS), ids=range(len(BAD_CONFIGS)))
def test_a_malformed_config_json_is_refused_with_its_reason(text, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(text)
    assert BAD_CONFIGS[text] in _refusal(folder)


def test_a_config_json_that_is_a_fifo_or_too_large_is_not_read(tmp_path, monkeypatch):

    from llmctl.core.errors import LlmctlError
    from llmctl.interop import hf_import

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(GPT2_CONFIG) + " " * 100)
    monkeypatch.setattr(hf_import, "CHECKPOINT_JSON_LIMIT", 64)
    with pytest.raises(LlmctlError, match="larger than 64 B"):
        hf_import.load_hf(f"hf:{folder}")
    # a FIFO named config.json: refused without waiting for a writer
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    with pytest.raises(LlmctlError, match="config.json is a FIFO"):
        hf_import.load_hf(f"hf:{folder}")


@pytest.mark.parametrize("index, reason", [
    ("[1]", "is not a JSON object"),
    (json.dumps({"weight_map": []}), "has no weight_map object"),
    (json.dumps({"weight_map": {"wte.weight": "../outside.safetensors"}}),
     "a shard must be a file name in its folder, not '../outside.safetensors'"),
    (json.dumps({"weight_map": {"wte.weight": 3}}), "not 3"),
])
def test_a_malformed_weight_index_is_refused(index, reason, checkpoint, tmp_path):
    from llmctl.interop.hf_export import export_checkpoint

    folder = tmp_path / "hf"
    export_checkpoint(checkpoint(CASES["gpt2"][0]), folder)
    (folder / "model.safetensors.index.json").write_text(index)
    assert reason in _refusal(folder)


def test_sample_and_eval_hf_path_equal_the_checkpoint(checkpoint, tmp_path):
    from llmctl.interop.hf_export import export_checkpoint

    # no padded rows: llmctl's own eval normalises over them, the export has none
    ckpt = checkpoint(CASES["llama_gqa"][0])
    export_checkpoint(ckpt, tmp_path / "hf")
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 4)

    def run(*args: str) -> dict:
        result = CliRunner().invoke(app, [*args, "--json", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    for target in (str(ckpt), f"hf:{tmp_path / 'hf'}"):
        sample = run("sample", target, "--prompt", "To be", "--temperature", "0",
                     "--max_new_tokens", "10", "--no_stop_at_eot")
        evaluated = run("eval", target, "--text", str(text))
        if target == str(ckpt):
            want_ids, want_loss = sample["samples"][0]["token_ids"], evaluated["loss"]
    assert sample["samples"][0]["token_ids"] == want_ids
    assert evaluated["loss"] == pytest.approx(want_loss, abs=1e-6)
