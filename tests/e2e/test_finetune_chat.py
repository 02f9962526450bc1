"""The README's "Fine-tuning and chat" commands at a tiny size, through real subprocesses:
base model, chat data, LoRA fine-tune with examples/finetune_chat.yaml, merge-lora, chat."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BASE = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--n_kv_heads", "2",
        "--block_size", "64", "--vocab_size", "72", "--up_dim", "64", "--batch_size", "4",
        "--total_batch_size", "256", "--warmup_steps", "2", "--learning_rate", "3e-3"]


def _llmctl(cwd: Path, *args: str, stdin: str | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "llmctl", *args], cwd=cwd, input=stdin,
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"llmctl {' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_base_lora_merge_and_chat(shakespeare_txt: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_txt.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    _llmctl(tmp_path, "prepare", "--source", str(corpus), "--name", "shakespeare_char",
            "--tokenizer", "char", "-q")
    _llmctl(tmp_path, "train", "--dataset", "shakespeare_char", *BASE, "--max_iters", "6",
            "--file_name", "base", "--save_model")
    _llmctl(tmp_path, "prepare", "--source", str(REPO / "examples/data/chat_tiny.jsonl"),
            "--format", "chat", "--tokenizer_from", "data/shakespeare_char", "--name",
            "chat_tiny", "-q")
    out = _llmctl(tmp_path, "train", "-c", str(REPO / "examples/finetune_chat.yaml"),
                  "--init_from", "runs/base",
                  "--max_iters", "4", "--batch_size", "4", "--total_batch_size", "256",
                  "--eval_interval", "2", "--eval_iters", "1", "--ckpt_interval", "2")
    assert "done: 4 steps" in out
    adapter = tmp_path / "runs/chat_lora/latest"
    assert (adapter / "adapter.safetensors").is_file()
    _llmctl(tmp_path, "merge-lora", "runs/chat_lora", "merged")
    answers = []
    for ckpt in ("runs/chat_lora", "merged"):
        text = _llmctl(tmp_path, "chat", ckpt, "--seed", "1", "--temperature", "0",
                       "--max_new_tokens", "10", "--device", "cpu",
                       stdin="Hello!\nWhat is the opposite of day?\n")
        assert text.count("assistant: ") == 2, text
        answers.append(text)
    assert answers[0] == answers[1]  # greedy: the adapter and its merge answer the same
