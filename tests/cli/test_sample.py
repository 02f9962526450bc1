"""llmctl sample through the real CLI: cached vs uncached greedy, seeds, filters, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.config import load_config
from llmctl.data.tokenizers import ByteTokenizer, CharTokenizer, create_tokenizer
from llmctl.infer.load import load_checkpoint
from llmctl.infer.sample import IncrementalDecoder, SampleSettings, encode_prompt, generate_samples
from llmctl.infer.sampling import next_token_probs
from llmctl.model import LLM
from llmctl.runtime.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[2]
BLOCK = 24
TEXT = ("Once upon a time there was a little fox. The fox ran to the river and drank. "
        "Then the fox slept under a tree, and the tree sang to the fox. ") * 6
ARCHS = {
    "mha": {"attn": "mha", "n_head": 2, "pos_emb": "learn"},
    "gqa": {"attn": "gqa", "n_head": 4, "n_kv_heads": 2, "pos_emb": "rope", "norm": "rms"},
    "mla": {"attn": "mla", "n_head": 2, "q_latent_dim": 8, "kv_latent_dim": 8,
            "rope_head_dim": 4, "pos_emb": "rope"},
    "moe": {"attn": "mqa", "n_head": 2, "moe": True, "n_exp": 4, "n_shared": 1, "n_act": 2,
            "coeff": 0.01, "pos_emb": "sin"},
    "mtp": {"attn": "gqa", "n_head": 4, "n_kv_heads": 2, "pos_emb": "alibi", "mtp_depth": 2},
}
runner = CliRunner()




def make_checkpoint(path: Path, tokenizer, arch: str = "mha", train_steps: int = 0,
                    ids: list[int] | None = None, **spec_override) -> Path:
    """A tiny LLM, optionally trained a few steps on `ids` (default: TEXT), saved as a
    checkpoint folder."""
    torch.manual_seed(0)
    run = load_config({"n_layer": 2, "n_embd": 32, "up_dim": 64, "block_size": BLOCK,
                       "vocab_size": tokenizer.vocab_size, **ARCHS[arch]},
                      check_batch_split=False)
    model = LLM(run.model)
    if train_steps:
        data = torch.tensor(tokenizer.encode(TEXT) if ids is None else ids)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        for _ in range(train_steps):
            starts = torch.randint(len(data) - BLOCK - 1, (8,), generator=gen)
            x = torch.stack([data[s:s + BLOCK] for s in starts])
            y = torch.stack([data[s + 1:s + BLOCK + 1] for s in starts])
            loss = model(x, targets=y).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    spec = {**tokenizer.spec, **spec_override} if spec_override else tokenizer.spec
    return save_checkpoint(path, state_dict=model.state_dict(), run=run, step=train_steps,
                           tokenizer=spec)


@pytest.fixture(scope="module")
def char_tok():
    return CharTokenizer.fit([TEXT])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, char_tok) -> Path:
    """A run folder whose best/ checkpoint has learned a little of TEXT."""
    run_dir = tmp_path_factory.mktemp("run")
    make_checkpoint(run_dir / "best", char_tok, train_steps=60)
    return run_dir


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, ["sample", *map(str, args)], input=input)


def sample_json(*args: str, input: str | None = None) -> dict:
    result = invoke(*args, "--json", input=input)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def tokens(out: dict) -> list[list[int]]:
    return [s["token_ids"] for s in out["samples"]]


def no_cache_greedy(model: LLM, ids: list[int], n: int) -> list[int]:
    """Reference decoding: recompute the whole (cropped) context every step, take the argmax."""
    context, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([context[-model.config.block_size:]])
            logits = model(x, targets=torch.zeros_like(x)).logits  # full forward, no cache
            token = int(logits[0, -1].argmax())
            out.append(token)
            context.append(token)
    return out


# ------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_greedy_equals_no_cache_reference(tmp_path, char_tok, arch):
    ckpt = make_checkpoint(tmp_path / "ckpt", char_tok, arch=arch)
    # 40 new tokens after a 9-token prompt runs past block_size=24: the sliding window too
    args = (ckpt, "--prompt", "The fox r", "--temperature", "0", "--max_new_tokens", "40",
            "--no-stop_at_eot")
    first, second = sample_json(*args), sample_json(*args)
    ids = first["samples"][0]["token_ids"]
    assert len(ids) == 40 and ids == second["samples"][0]["token_ids"]
    loaded = load_checkpoint(ckpt, device="cpu")
    assert ids == no_cache_greedy(loaded.model, char_tok.encode("The fox r"), 40)
    assert first["samples"][0]["text"] == char_tok.decode(ids)


def test_seeded_sampling_is_reproducible_and_seeds_differ(trained):
    args = (trained, "--temperature", "1.0", "--max_new_tokens", "60", "--num_samples", "2")
    a = sample_json(*args, "--seed", "7")
    b = sample_json(*args, "--seed", "7")
    c = sample_json(*args, "--seed", "8")
    texts = [[s["text"] for s in r["samples"]] for r in (a, b, c)]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]
    assert texts[0][0] != texts[0][1]  # the samples of one run are independent draws
    assert a["settings"]["seed"] == 7


def test_cli_reproduces_a_seed_it_chose(trained):
    first = sample_json(trained, "--max_new_tokens", "30", "--temperature", "1.0")
    seed = first["settings"]["seed"]
    again = sample_json(trained, "--max_new_tokens", "30", "--temperature", "1.0",
                        "--seed", str(seed))
    assert again["samples"][0]["text"] == first["samples"][0]["text"]


def test_top_k_and_top_p_restrict_the_support():
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    probs = logits.softmax(-1)
    for k in (1, 5, 17):
        filtered = next_token_probs(logits, temperature=1.0, top_k=k)
        for row in range(3):
            support = set(filtered[row].nonzero().flatten().tolist())
            assert support == set(logits[row].topk(k).indices.tolist())
            # renormalised over the support, in the original proportions
            kept = torch.tensor(sorted(support))
            expected = probs[row, kept] / probs[row, kept].sum()
            torch.testing.assert_close(filtered[row, kept], expected)
    for p in (0.05, 0.5, 0.9):
        filtered = next_token_probs(logits, temperature=1.0, top_p=p)
        for row in range(3):
            order = probs[row].argsort(descending=True).tolist()
            mass, nucleus = 0.0, []
            for token in order:  # the smallest most-likely set reaching p
                nucleus.append(token)
                mass += probs[row, token].item()
                if mass >= p:
                    break
            assert set(filtered[row].nonzero().flatten().tolist()) == set(nucleus)
            assert filtered[row].sum().item() == pytest.approx(1.0, abs=1e-5)
    # temperature sharpens before the filters: t -> 0 leaves only the argmax
    cold = next_token_probs(logits, temperature=0.0)
    assert torch.equal(cold.argmax(-1), logits.argmax(-1)) and torch.all(cold.sum(-1) == 1)


def test_top_k_1_and_tiny_top_p_sample_the_greedy_text(trained):
    greedy = sample_json(trained, "--temperature", "0", "--max_new_tokens", "30")
    top1 = sample_json(trained, "--top_k", "1", "--seed", "3", "--max_new_tokens", "30")
    nucleus = sample_json(trained, "--top-p", "1e-6", "--top-k", "0", "--seed", "4",
                          "--max-new-tokens", "30")
    text = greedy["samples"][0]["text"]
    assert top1["samples"][0]["text"] == text == nucleus["samples"][0]["text"]


# ------------------------------------------------------------------------------ behaviour


def test_streams_prompt_and_text_to_stdout_and_speed_to_stderr(trained):
    result = invoke(trained, "--prompt", "The fox", "--seed", "1", "--max_new_tokens", "25",
                    "--num_samples", "2")
    assert result.exit_code == 0, result.output
    samples = sample_json(trained, "--prompt", "The fox", "--seed", "1", "--max_new_tokens",
                          "25", "--num_samples", "2")["samples"]
    expected = "".join(f"The fox{s['text']}\n" for s in samples)
    assert result.stdout.replace("---------------\n", "") == expected
    assert result.stdout.count("---------------") == 1
    assert result.stderr.count("tokens/s") == 2 and "seed 1" in result.stderr


def test_both_flag_spellings_and_model_path(trained):
    a = sample_json(trained, "--max_new_tokens", "12", "--temperature", "0")
    b = sample_json("--model_path", trained, "--max-new-tokens", "12", "--temperature", "0")
    c = sample_json("--model-path", trained / "best", "--max_new_tokens", "12", "--temperature",
                    "0")
    assert tokens(a) == tokens(b) == tokens(c) and len(tokens(a)[0]) == 12
    assert a["checkpoint"] == str(trained / "best")


def test_prompt_from_file_and_stdin(trained, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("The tree", encoding="utf-8")
    args = ("--temperature", "0", "--max_new_tokens", "15")
    direct = sample_json(trained, "--prompt", "The tree", *args)
    from_file = sample_json(trained, "--prompt_file", prompt_file, *args)
    from_stdin = sample_json(trained, "--prompt-file", "-", *args, input="The tree")
    dash = sample_json(trained, "--prompt", "-", *args, input="The tree")
    assert tokens(direct) == tokens(from_file) == tokens(from_stdin) == tokens(dash)
    assert from_file["prompt"] == from_stdin["prompt"] == "The tree"


def test_empty_prompt_starts_from_end_of_text(trained, char_tok):
    out = sample_json(trained, "--prompt", "", "--temperature", "0", "--max_new_tokens", "10",
                      "--no-stop-at-eot")
    assert out["prompt_tokens"] == 1
    loaded = load_checkpoint(trained, device="cpu")
    assert out["samples"][0]["token_ids"] == no_cache_greedy(loaded.model, [char_tok.eot_id], 10)


def test_long_prompt_is_cropped_with_a_warning(trained, char_tok):
    prompt = TEXT[:60]
    result = invoke(trained, "--prompt", prompt, "--temperature", "0", "--max_new_tokens", "8",
                    "--json")
    assert result.exit_code == 0, result.output
    assert "warning" in result.stderr and f"block_size {BLOCK}" in result.stderr
    out = json.loads(result.stdout)
    assert out["prompt_tokens"] == BLOCK and out["prompt_cropped"] == 60 - BLOCK
    loaded = load_checkpoint(trained, device="cpu")
    tail = char_tok.encode(prompt)[-BLOCK:]
    assert out["samples"][0]["token_ids"] == no_cache_greedy(loaded.model, tail, 8)


def test_stops_at_end_of_text_unless_told_not_to(tmp_path):
    """A model trained on 'ab<eot>' repeated: greedy after 'ab' is end-of-text."""
    tok = CharTokenizer("ab")
    eot = tok.eot_id
    ckpt = make_checkpoint(tmp_path / "ckpt", tok, train_steps=40, ids=[0, 1, eot] * 40)
    stopped = sample_json(ckpt, "--prompt", "ab", "--temperature", "0")
    assert stopped["samples"][0]["stop_reason"] == "eot"
    assert stopped["samples"][0]["token_ids"] == [] and stopped["samples"][0]["text"] == ""
    going = sample_json(ckpt, "--prompt", "ab", "--temperature", "0", "--max_new_tokens", "6",
                        "--no-stop_at_eot")
    assert going["samples"][0]["token_ids"] == [eot, 0, 1, eot, 0, 1]
    assert going["samples"][0]["text"] == "<|endoftext|>ab<|endoftext|>ab"
    assert going["samples"][0]["stop_reason"] == "max_new_tokens"


def test_incremental_decoding_never_splits_a_character(gpt2_tiktoken):
    text = "naïve café — 日本語 🦊 done"
    for tokenizer in (ByteTokenizer(), create_tokenizer("gpt2", gpt2_tiktoken)):
        ids = tokenizer.encode(text)
        decoder = IncrementalDecoder(tokenizer.decode)
        pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert "".join(pieces) == text
        assert not any("\ufffd" in piece for piece in pieces)
        if isinstance(tokenizer, ByteTokenizer):
            assert "" in pieces  # held back inside multi-byte characters


def test_library_streams_what_it_returns(trained):
    loaded = load_checkpoint(trained, device="cpu")
    prompt = encode_prompt(loaded.tokenizer, "The", loaded.block_size)
    streamed: list[tuple[int, str]] = []
    samples = list(generate_samples(loaded, prompt, SampleSettings(
        max_new_tokens=20, seed=5, num_samples=2), on_text=lambda i, s: streamed.append((i, s))))
    for sample in samples:
        assert "".join(s for i, s in streamed if i == sample.index) == sample.text
        assert len(sample.token_ids) == 20 and sample.tokens_per_s > 0


# ------------------------------------------------------------------------------ bad input


def _error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.fixture
def ckpt(tmp_path, char_tok) -> Path:
    return make_checkpoint(tmp_path / "ckpt", char_tok)


def test_missing_folder_and_missing_config(tmp_path, ckpt):
    _error(invoke(tmp_path / "nope"), "does not exist")
    (ckpt / "config.json").unlink()
    _error(invoke(ckpt), "config.json is missing")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_weights(ckpt, damage):
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x13" * 100)
    _error(invoke(ckpt), "truncated or corrupted")


def test_weights_of_the_wrong_shape(tmp_path, char_tok, ckpt):
    other = make_checkpoint(tmp_path / "other", ByteTokenizer())  # vocab 257, not ~30
    (ckpt / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    _error(invoke(ckpt), "do not fit", "wte")


def test_pickles_are_refused_never_loaded(tmp_path, ckpt):
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    pickle_file = tmp_path / "model.pt"
    torch.save({"x": Evil()}, pickle_file)
    _error(invoke(pickle_file), "pickle")
    folder = tmp_path / "old_style"
    folder.mkdir()
    torch.save({"x": Evil()}, folder / "ckpt.pt")
    _error(invoke(folder), "pickle")
    (ckpt / "model.safetensors").unlink()
    torch.save({"x": Evil()}, ckpt / "model.pt")
    _error(invoke(ckpt), "pickle")
    assert not marker.exists()


def test_checkpoint_without_tokenizer(tmp_path, char_tok):
    run = load_config({"n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 8,
                       "vocab_size": 8}, check_batch_split=False)
    path = save_checkpoint(tmp_path / "c", state_dict=LLM(run.model).state_dict(), run=run,
                           step=0)
    _error(invoke(path), "records no tokenizer")


def test_bad_tokenizer_spec_and_vocab_mismatch(tmp_path, char_tok):
    bad = make_checkpoint(tmp_path / "bad", char_tok, kind="sentencepiece")
    _error(invoke(bad), "kind")
    run = load_config({"n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 8,
                       "vocab_size": 8}, check_batch_split=False)
    small = save_checkpoint(tmp_path / "small", state_dict=LLM(run.model).state_dict(), run=run,
                            step=0, tokenizer={"kind": "byte"})
    _error(invoke(small), "257 tokens", "vocab_size")


def test_bad_prompts(tmp_path, ckpt):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _error(invoke(ckpt, "--prompt_file", empty), "is empty")
    _error(invoke(ckpt, "--prompt_file", tmp_path / "missing.txt"), "does not exist")
    _error(invoke(ckpt, "--prompt_file", tmp_path), "is a folder")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    _error(invoke(ckpt, "--prompt_file", binary), "not UTF-8")
    _error(invoke(ckpt, "--prompt-file", "-", input=""), "stdin is empty")
    _error(invoke(ckpt, "--prompt", "Zebra §"), "outside the char vocabulary")


def test_bad_options(tmp_path, ckpt):
    _error(invoke(), "missing checkpoint")
    _error(invoke(ckpt, "--model_path", tmp_path / "else"), "not both")
    _error(invoke(ckpt, "--temperature", "-1"))
    _error(invoke(ckpt, "--top_p", "1.5"))
    _error(invoke(ckpt, "--top_p", "0"), "top_p")
    _error(invoke(ckpt, "--num_samples", "0"))
    _error(invoke(ckpt, "--device", "gpu9"), "is not one of auto, cpu, cuda")
    _error(invoke(ckpt, "--device", "meta"), "is not one of auto, cpu, cuda")
    _error(invoke(ckpt, "--seed", str(2**64)), "seed must be in [0, 2**63)")
    _error(invoke(ckpt, "--seed", "-1"), "seed must be in [0, 2**63)")
    _error(invoke(ckpt, "--dtype", "int8"), "dtype")
    if not torch.cuda.is_available():
        _error(invoke(ckpt, "--device", "cuda"), "CUDA is not available")


def test_real_process_streams_and_fails_without_traceback(trained, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "llmctl", "sample", str(trained), "--seed", "2",
                         "--max_new_tokens", "20", "--prompt", "The fox"],
                        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("The fox") and len(ok.stdout) > len("The fox\n")
    assert "tokens/s" in ok.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    bad = subprocess.run([sys.executable, "-m", "llmctl", "sample", str(broken)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2
    assert "error:" in bad.stderr and "not JSON" in bad.stderr
    assert "Traceback" not in bad.stderr + bad.stdout


@pytest.mark.gpu
def test_cuda_sampling_is_seeded(trained):
    args = (trained, "--device", "cuda", "--temperature", "1.0", "--max_new_tokens", "40")
    a, b = sample_json(*args, "--seed", "11"), sample_json(*args, "--seed", "11")
    assert a["samples"][0]["text"] == b["samples"][0]["text"]
    assert len(a["samples"][0]["token_ids"]) > 0


def test_num_samples_decode_as_one_batch(trained):
    """N samples come from one batched decode: seeded-deterministic, distinct when sampled,
    all equal to the single greedy sample at temperature 0."""
    loaded = load_checkpoint(trained, device="cpu")
    prompt = encode_prompt(loaded.tokenizer, "The", loaded.block_size)
    calls = []
    model_forward = loaded.model.forward

    def counting_forward(*args, **kwargs):
        calls.append(args[0].shape[0])  # the batch of every model call
        return model_forward(*args, **kwargs)

    loaded.model.forward = counting_forward
    settings = dict(max_new_tokens=20, stop_at_eot=False, temperature=1.0, top_k=None)
    first = list(generate_samples(loaded, prompt, SampleSettings(num_samples=4, seed=9,
                                                                 **settings)))
    assert calls and set(calls) == {4}  # one batch of 4, never one sample at a time
    again = list(generate_samples(loaded, prompt, SampleSettings(num_samples=4, seed=9,
                                                                 **settings)))
    assert [s.token_ids for s in first] == [s.token_ids for s in again]
    assert len({tuple(s.token_ids) for s in first}) > 1
    assert all(len(s.token_ids) == 20 for s in first)
    greedy = {**settings, "temperature": 0.0}
    one = list(generate_samples(loaded, prompt, SampleSettings(num_samples=1, **greedy)))
    three = list(generate_samples(loaded, prompt, SampleSettings(num_samples=3, **greedy)))
    assert all(s.token_ids == one[0].token_ids for s in three)


def test_speculative_greedy_equals_plain_greedy_and_reports_acceptance(tmp_path, char_tok):
    ckpt = make_checkpoint(tmp_path / "ckpt", char_tok, arch="mtp", train_steps=40)
    args = (ckpt, "--prompt", "The fox r", "--temperature", "0", "--max_new_tokens", "30",
            "--no-stop_at_eot")
    plain = sample_json(*args)
    spec = sample_json(*args, "--speculative")
    assert spec["samples"][0]["token_ids"] == plain["samples"][0]["token_ids"]
    report = spec["samples"][0]["speculative"]
    assert 0 <= report["acceptance_rate"] <= 1 and report["drafted"] > 0
    assert report["speedup"] > 0 and report["tokens_per_forward"] >= 1
    result = invoke(*args, "--speculative")
    assert result.exit_code == 0, result.output
    assert "acceptance rate" in result.stderr and "speed-up" in result.stderr


def test_speculative_without_mtp_modules_is_a_user_error(trained):
    result = invoke(trained / "best", "--speculative", "--max_new_tokens", "3")
    assert result.exit_code == 2
    assert "mtp_depth" in result.output
