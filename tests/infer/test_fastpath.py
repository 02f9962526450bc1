"""The fast decoding step equals the reference path (the model's own forward every step)."""

from __future__ import annotations

import pytest
import torch

from llmctl.config import load_config
from llmctl.infer import greedy_head, sampled_head
from llmctl.infer.decode import generate
from llmctl.infer.fastpath import FastDecoder, supports
from llmctl.infer.weight_layout import transposed_weights
from llmctl.model import LLM

MIXED = [
    {"attn": "mha", "n_head": 4, "moe": False, "up_dim": 48, "non_linearity": "gelu"},
    {"attn": "gqa", "n_head": 4, "n_kv_heads": 2, "moe": True, "up_dim": 24,
     "non_linearity": "swiglu", "n_exp": 5, "n_shared": 1, "n_act": 3, "coeff": 0.02},
    {"attn": "mla", "n_head": 2, "q_latent_dim": 16, "kv_latent_dim": 8, "rope_head_dim": 4,
     "moe": False, "up_dim": 16, "non_linearity": "relu2", "qk_norm": True},
    {"attn": "mqa", "n_head": 8, "moe": False, "up_dim": 40, "non_linearity": "geglu",
     "qk_norm": True},
]


def _model(**flags) -> LLM:
    base = dict(n_layer=2, n_embd=32, n_head=4, n_kv_heads=2, vocab_size=53, block_size=24,
                up_dim=48, q_latent_dim=16, kv_latent_dim=8, rope_head_dim=4, init_std=0.1)
    torch.manual_seed(0)
    return LLM(load_config(overrides={**base, **flags}, check_batch_split=False).model).eval()


CASES = [dict(attn=a, pos_emb=p) for a in ("mha", "mqa", "gqa", "mla")
         for p in ("learn", "sin", "rope")]
CASES += [dict(attn="gqa", pos_emb="rope", qk_norm=True, norm="rms", logit_softcap=5.0,
               tie_embeddings=False),
          dict(attn="mla", pos_emb="rope", moe=True, n_exp=4, n_shared=1, n_act=2, coeff=0.01),
          dict(pos_emb="rope", layer_configs=MIXED, n_layer=None)]


@pytest.fixture(params=["screened", "full_head"])
def head(request, monkeypatch) -> str:
    """Decoding steps (greedy, sampled) with the int8 screen of the head (also for these tiny
    heads) or without."""
    monkeypatch.setattr(greedy_head, "MIN_NUMBERS", 0 if request.param == "screened" else 1 << 62)
    monkeypatch.setattr(sampled_head, "TOP_K_MIN_NUMBERS", 0)  # top-k sampling too
    return request.param


@pytest.mark.parametrize("flags", CASES, ids=lambda f: "-".join(str(v) for v in f.values()
                                                                  if not isinstance(v, list)))
def test_step_logits_and_greedy_tokens_equal_the_reference(flags, head) -> None:
    model = _model(**flags)
    assert supports(model)
    prompt = torch.randint(0, 53, (2, 5))
    # 5 + 30 > block_size 24: the fast steps, then the cropping recompute after the window
    fast = generate(model, prompt, 30, temperature=0)
    reference = generate(model, prompt, 30, temperature=0, fast=False)
    assert torch.equal(fast, reference)
    with torch.no_grad():  # the logits of each step, not only their argmax
        decoder = FastDecoder(model, total_tokens=12)
        logits = decoder.prefill(prompt)
        out = model(prompt)
        for t in range(5, 12):
            token = reference[:, t]
            logits = decoder.step(token)
            out = model(token[:, None], kv_cache=out.kv_cache)
            assert torch.allclose(logits, out.logits[:, -1], atol=1e-5, rtol=0)
        assert decoder.cache.layers[0].allocated == 24  # reserved once, capped at block_size


@pytest.mark.parametrize("attn", ["mha", "mqa", "gqa", "mla"])
def test_greedy_steps_pick_the_argmax_of_the_step_logits(attn, head) -> None:
    model = _model(attn=attn, pos_emb="rope", n_embd=64, logit_softcap=2.0)
    prompt = torch.randint(0, 53, (3, 4))
    with torch.no_grad():
        greedy, full = FastDecoder(model, 20), FastDecoder(model, 20)
        greedy.prefill(prompt)
        token = full.prefill(prompt).argmax(dim=-1)
        for _ in range(15):
            logits = full.step(token)
            for limit in (None, 40):  # the padding ids past a tokenizer's size never win
                assert torch.equal(greedy.greedy_step(token, limit),
                                   logits[:, :limit].argmax(dim=-1))
                greedy.cache.truncate(greedy.length - 1)
            greedy.greedy_step(token)
            token = logits.argmax(dim=-1)
        assert (greedy._screen is not None) == (head == "screened")
    limited = generate(model, prompt, 12, temperature=0, vocab_limit=40)
    assert torch.equal(limited, generate(model, prompt, 12, temperature=0, vocab_limit=40,
                                         fast=False))
    assert (limited[:, 4:] < 40).all()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("top_p", [None, 0.8])
def test_seeded_top_k_sampling_equals_the_reference(batch, top_p, head) -> None:
    # top-k through the screen draws the full head's token for the same random number
    model = _model(attn="gqa", pos_emb="rope")
    prompt = torch.randint(0, 53, (batch, 4))
    runs = [generate(model, prompt, 15, temperature=1.0, top_k=10, top_p=top_p, fast=fast,
                     generator=torch.Generator().manual_seed(7)) for fast in (True, False)]
    assert torch.equal(*runs)


def test_untruncated_sampling_through_the_screen_repeats_with_its_seed(monkeypatch) -> None:
    monkeypatch.setattr(greedy_head, "MIN_NUMBERS", 0)
    model = _model(attn="mla", pos_emb="rope")
    calls = []
    sampler_call = sampled_head.ScreenedSampler.__call__

    def counted(self, *args, **kwargs):
        chosen = sampler_call(self, *args, **kwargs)
        calls.append(chosen is not None)
        return chosen

    monkeypatch.setattr(sampled_head.ScreenedSampler, "__call__", counted)
    prompt = torch.randint(0, 53, (1, 4))
    runs = [generate(model, prompt, 20, temperature=1.0,
                     generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*runs)
    assert len(calls) == 38 and sum(calls) >= 30  # 19 steps a run, nearly all screened
    assert (runs[0] < 53).all()


def test_cache_never_grows_during_decoding() -> None:
    model = _model(block_size=200)
    with torch.no_grad():
        decoder = FastDecoder(model, total_tokens=150)
        decoder.prefill(torch.randint(0, 53, (1, 3)))
        buffers = [b.data_ptr() for layer in decoder.cache.layers for b in layer.buffers]
        token = torch.tensor([1])
        for _ in range(140):
            decoder.step(token)
        assert decoder.length == 143
        assert [b.data_ptr() for layer in decoder.cache.layers for b in layer.buffers] == buffers


def _assert_steps_equal_the_forward(model: LLM, prompt: torch.Tensor, steps: int,
                                    total_tokens: int, atol: float = 1e-5,
                                    decoder: FastDecoder | None = None) -> FastDecoder:
    """Each fast step's logits against the model's own cached forward, token by token
    (`decoder`: a kept one, else a new one)."""
    with torch.no_grad():
        decoder = decoder or FastDecoder(model, total_tokens=total_tokens)
        logits, out = decoder.prefill(prompt, total_tokens), model(prompt)
        for _ in range(steps):
            token = logits.argmax(-1)
            logits = decoder.step(token)
            out = model(token[:, None], kv_cache=out.kv_cache)
            assert logits.dtype == model.wte.weight.dtype
            assert torch.allclose(logits, out.logits[:, -1], atol=atol, rtol=0)
    return decoder


def test_steps_past_the_reserved_rows_grow_the_cache_and_stay_exact() -> None:
    for attn in ("gqa", "mla"):
        model = _model(attn=attn, pos_emb="rope", block_size=200)
        # 3 reserved tokens -> 64 rows allocated; 80 steps grow them once
        decoder = _assert_steps_equal_the_forward(model, torch.randint(0, 53, (2, 3)), 80, 3)
        assert decoder.cache.layers[0].allocated == 128


@pytest.mark.parametrize("absorb", [True, False])
@pytest.mark.parametrize("q_latent_dim", [16, 64])  # W_uq (16 -> 48) copied; (64 -> 48) not
def test_mla_with_and_without_w_uk_merged_into_the_query_weights(absorb, q_latent_dim,
                                                                 monkeypatch) -> None:
    import llmctl.infer.fastpath as fastpath

    if not absorb:  # the merged matrix counts as too large
        monkeypatch.setattr(fastpath, "_ABSORB_SLACK", -10**9)
    model = _model(attn="mla", pos_emb="rope", q_latent_dim=q_latent_dim)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    decoder = _assert_steps_equal_the_forward(model, torch.randint(0, 53, (2, 5)), 12, 17)
    assert [layer.absorbed for layer in decoder._layers] == [absorb] * 2
    q_up = decoder._layers[0].w_q
    assert q_up.is_contiguous() == (absorb or q_latent_dim == 16)
    # the scale went into the decoder's own copies, never into the model's weights
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    prompt = torch.randint(0, 53, (1, 4))
    assert torch.equal(generate(model, prompt, 12, temperature=0),
                       generate(model, prompt, 12, temperature=0, fast=False))


@pytest.mark.parametrize("attn", ["mha", "gqa", "mla"])
def test_float64_steps_equal_the_reference(attn) -> None:
    model = _model(attn=attn, pos_emb="rope", qk_norm=attn == "gqa").double()
    _assert_steps_equal_the_forward(model, torch.randint(0, 53, (2, 4)), 5, 9, atol=1e-12)


@pytest.mark.parametrize("flags", [dict(), dict(logit_softcap=5.0, tie_embeddings=False)])
def test_sampling_float64_and_padded_vocabularies_through_the_screen(flags, head) -> None:
    model = _model(attn="gqa", pos_emb="rope", **flags).double()
    prompt = torch.randint(0, 40, (1, 4))
    for top_k in (10, 45):  # 45 > the 40 real ids: no truncation, padding never drawn
        runs = [generate(model, prompt, 12, temperature=0.8, top_k=top_k, vocab_limit=40,
                         fast=fast, generator=torch.Generator().manual_seed(5))
                for fast in (True, False)]
        assert (runs[0][:, 4:] < 40).all()
        if top_k == 10:  # untruncated draws use other random numbers than the full head's
            assert torch.equal(*runs)


def test_a_kept_decoder_reuses_its_weights_until_the_model_changes() -> None:
    from llmctl.infer.decode import stream_tokens

    model = _model(attn="gqa", pos_emb="rope")
    decoder = FastDecoder(model, total_tokens=0)
    layers = decoder._layers
    for prompt in (torch.randint(0, 53, (1, 4)), torch.randint(0, 53, (2, 6))):
        assert torch.equal(generate(model, prompt, 10, temperature=0, decoder=decoder),
                           generate(model, prompt, 10, temperature=0, fast=False))
        assert decoder.cache is None  # released when the stream ends
    assert decoder._layers is layers  # not prepared again
    qkv = model.blocks[0].attn.qkv.weight
    with torch.no_grad():  # an in-place update, as an optimizer step makes
        qkv.add_(0.1 * torch.randn_like(qkv))
    prompt = torch.randint(0, 53, (2, 5))
    _assert_steps_equal_the_forward(model, prompt, 6, 11, decoder=decoder)
    assert decoder._layers is not layers  # prepared again for the changed weights
    with pytest.raises(ValueError, match="another model"):
        list(stream_tokens(_model(attn="mla"), prompt, 2, decoder=decoder))


def test_screened_greedy_steps_never_copy_the_whole_head(monkeypatch) -> None:
    monkeypatch.setattr(greedy_head, "MIN_NUMBERS", 0)
    model = _model(vocab_size=2048, init_std=0.02)  # a head the screen narrows to a few ids
    decoder = FastDecoder(model, total_tokens=0)
    prompt = torch.randint(0, 2048, (1, 4))
    assert torch.equal(generate(model, prompt, 12, temperature=0, decoder=decoder),
                       generate(model, prompt, 12, temperature=0, fast=False))
    assert decoder._screen is not None and decoder._head_t is None  # only the survivors' rows
    with torch.no_grad():  # the logits of a step need all of it: copied then, once
        decoder.prefill(prompt, total_tokens=6)
        logits = decoder.step(prompt[:, -1])
        longer = torch.cat((prompt, prompt[:, -1:]), dim=1)
        assert torch.allclose(logits, model(longer).logits[:, -1], atol=1e-5)
    head_t = decoder._head_t
    assert head_t.is_contiguous() and torch.equal(head_t, model.lm_head.weight.t())
    assert head_t.data_ptr() != model.lm_head.weight.data_ptr()
    assert decoder._full_head() is head_t


def test_unknown_modules_use_the_reference_path() -> None:
    model = _model()
    model.blocks[0].attn_norm = torch.nn.Identity()
    assert not supports(model)
    assert generate(model, torch.zeros(1, 2, dtype=torch.long), 4, temperature=0).shape == (1, 6)


def test_cpu_fp32_weights_are_used_transposed_and_contiguous() -> None:
    model = _model(attn="mla", pos_emb="rope")
    weights = transposed_weights(model)
    head = weights[id(model.lm_head.weight)]
    assert head.is_contiguous() and torch.equal(head, model.lm_head.weight.t())
    assert head.data_ptr() != model.lm_head.weight.data_ptr()  # a copy, not the parameter
    assert len(weights) == 1 + 4 * len(model.blocks)  # head; q_up, proj, up, down
    for block in model.blocks:  # copied where the output is at least as wide as the input
        up, down = weights[id(block.ffn.up.weight)], weights[id(block.ffn.down.weight)]
        assert up.is_contiguous() and up.data_ptr() != block.ffn.up.weight.data_ptr()
        assert down.data_ptr() == block.ffn.down.weight.data_ptr()  # the weight's own rows
        assert torch.equal(down, block.ffn.down.weight.t())
    blocks_only = transposed_weights(model, head=False)  # what a decoder copies up front
    assert id(model.lm_head.weight) not in blocks_only and len(blocks_only) == len(weights) - 1


def test_no_weight_copies_when_they_would_not_fit(monkeypatch) -> None:
    import llmctl.infer.weight_layout as weight_layout

    model = _model()
    monkeypatch.setattr(weight_layout, "available_memory", lambda device: (1000, "test"))
    weights = transposed_weights(model)
    assert all(w.data_ptr() == p.data_ptr() for p in model.parameters()
               for w in [weights.get(id(p))] if w is not None)
    prompt = torch.randint(0, 53, (1, 4))
    assert torch.equal(generate(model, prompt, 8, temperature=0),
                       generate(model, prompt, 8, temperature=0, fast=False))


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_bfloat16_greedy_tokens_equal_the_reference(attn) -> None:
    model = _model(attn=attn, pos_emb="rope").to(torch.bfloat16)
    prompt = torch.randint(0, 53, (2, 5))
    assert torch.equal(generate(model, prompt, 15, temperature=0),
                       generate(model, prompt, 15, temperature=0, fast=False))


@pytest.mark.parametrize("attn", ["mha", "mla"])
def test_steps_under_bfloat16_autocast_follow_the_reference(attn) -> None:
    # `sample --dtype bfloat16` decodes fp32 weights under autocast: the products return
    # bf16 rows, so the residual adds cannot go into the fp32 row in place
    model = _model(attn=attn, pos_emb="rope", n_layer=1)
    prompt = torch.randint(0, 53, (1, 5))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        decoder = FastDecoder(model, total_tokens=8)
        fast = decoder.prefill(prompt)
        out = model(prompt)
        for token in (3, 17, 41):
            token = torch.tensor([token])
            fast = decoder.step(token)
            out = model(token[:, None], kv_cache=out.kv_cache)
            assert fast.dtype == out.logits.dtype == torch.bfloat16
            assert torch.allclose(fast.float(), out.logits[:, -1].float(), atol=0.1, rtol=0)
