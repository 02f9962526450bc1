"""llmctl prepare through the CLI: flags in both spellings, messages, real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.core.errors import LlmctlError
from llmctl.data.loader import PreparedDataset

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    env.pop("LLMCTL_TIKTOKEN_FILE", None)
    return env


def test_both_flag_spellings_and_idempotent_rerun(shakespeare_txt, gpt2_tiktoken, tmp_path):
    data_dir = tmp_path / "data"
    first = runner.invoke(app, [
        "prepare", "--source", str(shakespeare_txt), "--name", "sh", "--data-dir",
        str(data_dir), "--tokenizer-file", str(gpt2_tiktoken), "--max-tokens", "20k",
        "--num-proc", "1", "--val-fraction", "0.2"])
    assert first.exit_code == 0, first.output
    assert "prepared sh" in first.stdout and "16,000 tokens" in first.stdout
    assert "tokens," in first.stderr and "tok/s" in first.stderr  # plain progress: not a TTY
    again = runner.invoke(app, [
        "prepare", "--source", str(shakespeare_txt), "--name", "sh", "--data_dir",
        str(data_dir), "--tokenizer_file", str(gpt2_tiktoken), "--max_tokens", "2e4",
        "--num_proc", "1", "--val_fraction", "0.2", "--json", "-q"])
    assert again.exit_code == 0, again.output
    assert "already prepared" in again.stderr
    meta = json.loads(again.stdout)
    assert meta == json.loads((data_dir / "sh" / "meta.json").read_text())
    assert meta["splits"]["train"]["tokens"] == 16_000 and meta["tokenizer"]["name"] == "gpt2"


@pytest.mark.parametrize("args, message", [
    (["prepare", "shakespear"], "did you mean 'shakespeare'"),
    (["prepare"], "name a dataset"),
    (["prepare", "--source", "x.txt", "--max_tokens", "lots"], "not a count"),
    (["prepare", "--source", "x.txt", "--max_tokens", "1e400"], "'1e400' is too large"),
    (["prepare", "--source", "x.txt", "--max_tokens", "1e999B"], "'1e999B' is too large"),
    (["prepare", "--source", "/nonexistent/corpus.txt", "--tokenizer", "byte"],
     "does not exist"),
    # checked before any tokenizer is built
    (["prepare", "--source", "/nonexistent/corpus.txt"], "--source /nonexistent/corpus.txt "
     "does not exist"),
    (["prepare", "fineweb", "--subset", "sample-1BT"], "did you mean 'sample-10BT'"),
    (["prepare", "--source", "x.txt", "--tokenizer", "char", "--tokenizer_file", "r.tiktoken"],
     "not --tokenizer char"),
])
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    result = runner.invoke(app, [*args, "--data_dir", str(tmp_path / "data")])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


@pytest.mark.slow
def test_unreachable_hub_names_the_dataset_and_the_way_out(tmp_path):
    data_dir = tmp_path / "data"
    proc = subprocess.run(
        [sys.executable, "-m", "llmctl", "prepare", "tinystories", "--tokenizer", "byte",
         "--data_dir", str(data_dir), "--cache_dir", str(tmp_path / "hf")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env=_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert proc.returncode == 2, proc.stderr
    assert "roneneldan/TinyStories" in proc.stderr and "Hugging Face Hub" in proc.stderr
    assert "--source DIR" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in data_dir.iterdir()] == []


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM],
                         ids=["SIGKILL", "SIGINT", "SIGTERM"])
def test_killed_prepare_leaves_nothing_that_looks_finished(shakespeare_txt, gpt2_tiktoken,
                                                           tmp_path, sig):
    corpus = tmp_path / "big.txt"
    corpus.write_bytes(shakespeare_txt.read_bytes() * 30)  # ~33 MB: seconds to tokenize
    data_dir = tmp_path / "data"
    cmd = [sys.executable, "-m", "llmctl", "prepare", "--source", str(corpus), "--name", "big",
           "--data_dir", str(data_dir), "--tokenizer_file", str(gpt2_tiktoken), "--num_proc",
           "2", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            partial = list(data_dir.glob(".big.partial-*/all.bin")) if data_dir.exists() else []
            if partial and partial[0].stat().st_size > 0:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "prepare ended before it could be killed"
        workers = _children(proc.pid)
        proc.send_signal(sig)
        stderr = proc.communicate(timeout=60)[1].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert not (data_dir / "big").exists()  # nothing that looks finished
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert list(data_dir.glob(".big.partial-*"))  # only the hidden partial folder
    else:  # unwound like an error: exit code 128 + signal, partial output removed
        assert proc.returncode == 128 + sig and "Traceback" not in stderr
        assert list(data_dir.iterdir()) == []
        return
    with pytest.raises(LlmctlError, match="llmctl prepare --source PATH --name big"):
        PreparedDataset.open(data_dir, "big")
    deadline = time.monotonic() + 10  # orphaned workers notice and exit
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)
    if Path("/proc/self/task").is_dir():
        assert len(workers) >= 2  # the kill really hit a run with worker processes
    # The next run cleans up and finishes.
    rerun = subprocess.run([*cmd[:-3], "--max_tokens", "5000", "--num_proc", "1"], cwd=tmp_path,
                           env=_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in data_dir.iterdir()) == ["big"]
    assert PreparedDataset.open(data_dir, "big").num_tokens("train") == 4500
