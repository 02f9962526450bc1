"""lm-eval on the llmctl model: a local multiple-choice task scored by hand from llmctl's own
log-likelihoods, and loglikelihood = the sum of llmctl's token log-probs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from llmctl.cli import app

pytest.importorskip("lm_eval")

DOCS = [
    {"question": "The king said", "choices": ["yes", "no", "maybe"], "answer": 0},
    {"question": "To be or", "choices": ["not", "so", "be"], "answer": 0},
    {"question": "What light", "choices": ["breaks", "is", "was"], "answer": 1},
    {"question": "Friends, Romans", "choices": ["lend", "country", "men"], "answer": 2},
    {"question": "Now is the winter", "choices": ["of", "in", "at"], "answer": 0},
    {"question": "All the world", "choices": ["is a stage", "goes", "turns"], "answer": 0},
]


def write_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    return folder


def _sum_logprob(model, tok, context: str, continuation: str) -> float:
    ctx, cont = tok.encode(context), tok.encode(continuation)
    idx = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(idx, use_cache=False).logits[0, :-1], dim=-1)  # (T-1, V)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_local_task_accuracy_equals_the_hand_computed_one(checkpoint, tmp_path):
    from llmctl.infer.load import load_checkpoint

    ckpt = checkpoint({"pos_emb": "rope", "norm": "rms", "non_linearity": "swiglu"}, seed=3)
    loaded = load_checkpoint(ckpt, device="cpu")
    hits = []
    for doc in DOCS:  # lm-eval joins question and choice with its target delimiter " "
        scores = [_sum_logprob(loaded.model, loaded.tokenizer, doc["question"], " " + c)
                  for c in doc["choices"]]
        hits.append(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    want = sum(hits) / len(hits)

    result = CliRunner().invoke(app, [
        "eval", str(ckpt), "--tasks", "tiny_mc", "--include_path",
        str(write_task(tmp_path / "tasks")), "--json", "--device", "cpu", "--batch_size", "4"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["results"]["tiny_mc"]["acc,none"] == pytest.approx(want, abs=1e-12)

    table = CliRunner().invoke(app, [
        "eval", str(ckpt), "--tasks", "tiny_mc", "--include_path", str(tmp_path / "tasks"),
        "--device", "cpu", "--limit", "3"])
    assert table.exit_code == 0, table.output
    assert "tiny_mc" in table.output and "acc" in table.output


def test_loglikelihood_is_the_sum_of_llmctl_token_logprobs(checkpoint):
    from lm_eval.api.instance import Instance

    from llmctl.infer.load import load_checkpoint
    from llmctl.interop.lm_eval import LlmctlLM

    loaded = load_checkpoint(checkpoint({}), device="cpu")
    lm = LlmctlLM(loaded, batch_size=2)
    pairs = [("To be, or not", " to be"), ("What light", " breaks"), ("A", " b c")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests)
    for (context, continuation), (ll, greedy) in zip(pairs, got, strict=True):
        assert ll == pytest.approx(_sum_logprob(loaded.model, loaded.tokenizer, context,
                                                continuation), abs=1e-5)
        assert isinstance(greedy, bool)
    text = "To be, or not to be, that is the question. " * 3  # longer than block_size (32)
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = loaded.tokenizer.encode(text)
    # by hand: every token scored once, in block_size windows after end-of-text; the last,
    # shorter window still sees a full block of preceding tokens (lm-eval's rolling windows)
    total, block, inputs = 0.0, loaded.block_size, [loaded.tokenizer.eot_id] + ids
    with torch.no_grad():
        for start in range(0, len(ids), block):
            end = min(start + block, len(ids))
            lo = max(0, end - block)
            logp = F.log_softmax(loaded.model(torch.tensor([inputs[lo:end]]),
                                              use_cache=False).logits[0], -1)  # (T, V)
            targets = torch.tensor(ids[lo:end])[:, None]
            total += logp.gather(-1, targets)[start - lo:].sum().item()
    assert len(ids) > 2 * block
    assert rolling == pytest.approx(total, abs=1e-4)
    (generated,) = lm.generate_until([Instance("generate_until", {}, (
        "To be", {"until": ["\n"], "max_gen_toks": 5}), 0)])
    assert isinstance(generated, str) and "\n" not in generated and len(generated) <= 5


@pytest.mark.slow  # indexes lm-eval's whole task registry (~1.5 min on 2 cores)
def test_hub_task_offline_says_so(checkpoint, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    result = CliRunner().invoke(app, ["eval", str(checkpoint({})), "--tasks", "arc_easy",
                                      "--limit", "2", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "Hub is unreachable or offline" in result.output


BROKEN_TASKS = {
    "unknown key": (lambda f: (f / "tiny_mc.yaml").write_text(
        (f / "tiny_mc.yaml").read_text() + "bogus_key: 3\n"), "unexpected keyword argument"),
    "answer past the choices": (lambda f: (f / "tiny_mc.jsonl").write_text("".join(
        json.dumps({**d, "answer": 5}) + "\n" for d in DOCS)), "IndexError"),
    "missing data file": (lambda f: (f / "tiny_mc.jsonl").unlink(),
                          "a data file the task's YAML names is missing"),
}


@pytest.mark.parametrize("case", list(BROKEN_TASKS))
def test_a_broken_local_task_is_a_message(checkpoint, tmp_path, case):
    edit, needle = BROKEN_TASKS[case]
    tasks = write_task(tmp_path / "tasks")
    edit(tasks)
    result = CliRunner().invoke(app, ["eval", str(checkpoint({})), "--tasks", "tiny_mc",
                                      "--include_path", str(tasks), "--device", "cpu",
                                      "--limit", "2"])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
