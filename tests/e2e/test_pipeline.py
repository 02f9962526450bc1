"""A new user's path through the real CLI, in subprocesses: prepare -> train -> eval -> sample
-> inspect-params, and the same training under `torchrun --nproc_per_node 2`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "NO_COLOR": "1"}
MODEL = ["--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--attn", "gqa", "--n_kv_heads",
         "2", "--pos_emb", "rope", "--norm", "rms", "--non_linearity", "swiglu", "--up_dim",
         "64", "--block_size", "32", "--vocab_size", "64"]
TRAIN = ["--batch_size", "4", "--total_batch_size", "256", "--max_iters", "8",
         "--warmup_steps", "2", "--learning_rate", "3e-3", "--eval", "--eval_interval", "4",
         "--eval_iters", "3", "--save_model", "--ckpt_interval", "4", "--log_interval", "2",
         "--seed", "5"]

pytestmark = pytest.mark.slow


def llmctl(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "llmctl", *args], cwd=cwd, env=ENV,
                         capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 0, (args, out.stdout, out.stderr)
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, shakespeare_txt: Path) -> Path:
    """A working folder with data/plays prepared from a local copy of the corpus."""
    work = tmp_path_factory.mktemp("e2e")
    corpus = work / "plays.txt"
    corpus.write_text(shakespeare_txt.read_text(encoding="utf-8")[:80_000], encoding="utf-8")
    out = llmctl("prepare", "--source", str(corpus), "--tokenizer", "char", "--quiet",
                 cwd=work)
    meta = json.loads((work / "data" / "plays" / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "char" and meta["vocab_size"] <= 64, out.stdout
    return work


def test_prepare_train_eval_sample_inspect(prepared: Path) -> None:
    work = prepared
    llmctl("train", "--dataset", "plays", "--file_name", "first", *MODEL, *TRAIN, cwd=work)
    run = work / "runs" / "first"
    assert {"latest", "best", "metrics.jsonl", "loss_curve.png"} <= {p.name for p in
                                                                     run.iterdir()}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8]
    best = json.loads((run / "best" / "config.json").read_text())
    assert best["metrics"]["val_loss"] == pytest.approx(min(r["val_loss"] for r in evals))
    trains = [r["loss"] for r in records if r["kind"] == "train"]
    assert trains[-1] < trains[0]  # it learned something

    # eval reproduces the trainer's estimate, and --full walks the whole split
    estimate = json.loads(llmctl("eval", str(run), "--json", cwd=work).stdout)
    assert estimate["loss"] == pytest.approx(best["metrics"]["val_loss"], rel=1e-5)
    full = json.loads(llmctl("eval", str(run / "latest"), "--full", "--json", cwd=work).stdout)
    val_tokens = json.loads((work / "data" / "plays" / "meta.json").read_text())[
        "splits"]["val"]["tokens"]
    assert full["tokens"] == val_tokens - 1  # every token after the first predicted once
    assert full["perplexity"] == pytest.approx(2.718281828 ** full["loss"], rel=1e-6)

    # sample: greedy is deterministic, text streams to stdout, stats go to stderr
    args = ["sample", str(run), "--prompt", "ROMEO:", "--max_new_tokens", "40",
            "--temperature", "0"]
    first, again = llmctl(*args, cwd=work), llmctl(*args, cwd=work)
    assert first.stdout == again.stdout and first.stdout.startswith("ROMEO:")
    assert len(first.stdout) > len("ROMEO:") and "tokens/s" in first.stderr
    as_json = json.loads(llmctl(*args, "--json", cwd=work).stdout)
    assert first.stdout.rstrip("\n").endswith(as_json["samples"][0]["text"].rstrip("\n"))

    # inspect-params on the checkpoint counts exactly the parameters the weights file holds
    report = json.loads(llmctl("inspect-params", str(run / "best"), "--json", cwd=work).stdout)
    from safetensors.torch import load_file

    weights = load_file(run / "best" / "model.safetensors")  # tied weights are stored once
    assert report["params"]["total"] == sum(t.numel() for t in weights.values())


@pytest.mark.skipif(shutil.which("torchrun") is None and not (
    Path(sys.executable).parent / "torchrun").exists(), reason="torchrun not installed")
def test_torchrun_two_processes_match_one(prepared: Path) -> None:
    work = prepared
    common = ["--dataset", "plays", *MODEL, *TRAIN, "--no_save_model", "--no_eval"]
    llmctl("train", "--file_name", "single", *common, cwd=work)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "llmctl",
                          "train", "--file_name", "ddp", *common], cwd=work, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]

    def losses(name: str) -> list[float]:
        lines = (work / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]

    single, ddp = losses("single"), losses("ddp")
    assert len(single) == len(ddp) == 4
    assert ddp == pytest.approx(single, abs=1e-4)
