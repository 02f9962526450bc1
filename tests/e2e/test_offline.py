"""A fresh machine without network, through the real CLI in subprocesses: the README's main
job as written, `prepare shakespeare` with the built-in GPT-2 tokenizer, a bare `train`, and
prepare's report of everything it cannot reach.

Offline means: every proxy variable points at a closed port on 127.0.0.1 (so any HTTP(S)
request fails at once), the Hugging Face libraries are in offline mode, and tiktoken's cache
is an empty folder.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")
# The README's main job, shortened for the suite: only the train step gets these flags.
SHORT_TRAIN = ["--max_iters", "20", "--eval_interval", "10", "--warmup_steps", "5"]

pytestmark = pytest.mark.slow


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def offline(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """(working folder, environment): no network, `llmctl` on PATH runs this checkout."""
    work, tiktoken_cache, bin_dir = tmp_path / "work", tmp_path / "tiktoken", tmp_path / "bin"
    for folder in (work, tiktoken_cache, bin_dir):
        folder.mkdir()
    (work / "examples").symlink_to(REPO / "examples", target_is_directory=True)
    shim = bin_dir / "llmctl"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m llmctl \"$@\"\n")
    shim.chmod(0o755)
    drop = {"NO_PROXY", "no_proxy", "LLMCTL_TIKTOKEN_FILE", "LLMCTL_SHAKESPEARE_URL"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    proxy = f"http://127.0.0.1:{_closed_port()}"
    env.update({name: proxy for name in PROXIES})
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TIKTOKEN_CACHE_DIR=str(
        tiktoken_cache), WANDB_MODE="offline", PYTHONPATH=str(REPO), NO_COLOR="1",
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    return work, env


def _shell(command: str, work: Path, env: dict[str, str], timeout: int = 600
           ) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _ok(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 0, (out.args, out.stdout[-2000:], out.stderr[-2000:])
    return out


def readme_main_job() -> str:
    """The first bash block under "## The main job in one command" in README.md."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## The main job in one command", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)\n```", section, re.S)
    assert block, "README.md's main job has no ```bash block"
    return block.group(1).strip()


def test_readme_main_job_runs_offline(offline) -> None:
    work, env = offline
    steps = [part.strip() for part in readme_main_job().split("&&")]
    assert [shlex.split(s)[:2] for s in steps] == [["llmctl", "prepare"], ["llmctl", "train"],
                                                   ["llmctl", "sample"]], steps
    outputs = []
    for step in steps:
        if shlex.split(step)[1] == "train":  # as written, only shorter
            step = f"{step} {shlex.join(SHORT_TRAIN)}"
        outputs.append(_ok(_shell(step, work, env)))
    prompt = shlex.split(steps[2])[shlex.split(steps[2]).index("--prompt") + 1]
    sample = outputs[2].stdout
    assert prompt == "ROMEO:" and sample.startswith(prompt), sample[:200]
    assert sample[len(prompt):].strip(), sample  # a continuation
    stats = re.search(r"sample 1/1: (\d+) tokens in .*stopped at (\S+)", outputs[2].stderr)
    assert stats, outputs[2].stderr
    if stats.group(2) == "max_new_tokens":  # else end-of-text, unlikely but allowed
        assert int(stats.group(1)) == 300 and len(sample) >= len(prompt) + 300
    run = work / "runs" / "cpu_tiny"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [10, 20]
    meta = json.loads((work / "data" / "shakespeare" / "meta.json").read_text())
    assert meta["options"]["source"] == "embedded:tinyshakespeare.txt"
    assert sum(s["tokens"] for s in meta["splits"].values()) == 1_115_394 + 1  # + end-of-text


def test_prepare_gpt2_offline_is_tiktokens_gpt2(offline, shared_gpt2_tiktoken,
                                                 shared_shakespeare_txt) -> None:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext import openai_public

    work, env = offline
    _ok(_shell("llmctl prepare shakespeare --quiet", work, env))
    folder = work / "data" / "shakespeare"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["tokenizer"]["name"] == "gpt2" and meta["dtype"] == "uint16"
    stream = np.concatenate([np.fromfile(folder / meta["splits"][s]["file"], dtype="<u2")
                             for s in ("train", "val")])
    reference = tiktoken.Encoding(
        name="gpt2", pat_str=openai_public.r50k_pat_str,
        mergeable_ranks=load_tiktoken_bpe(str(shared_gpt2_tiktoken)),
        special_tokens={openai_public.ENDOFTEXT: 50256})
    # one document: its tokens, then end-of-text; train is the first 90%, val the rest
    expected = reference.encode_ordinary(shared_shakespeare_txt.read_text(encoding="utf-8"))
    np.testing.assert_array_equal(stream, [*expected, reference.eot_token])
    assert meta["splits"]["train"]["tokens"] == int(len(stream) * 0.9)


def test_bare_validate_config_and_train(offline) -> None:
    work, env = offline
    out = _ok(_shell("llmctl validate-config", work, env))
    assert "config OK" in out.stdout and "mqa" in out.stdout and "2 × 512" in out.stdout
    missing = _shell("llmctl train --max_iters 2", work, env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "run `llmctl prepare shakespeare` first" in missing.stderr
    _ok(_shell("llmctl prepare shakespeare --quiet", work, env))
    out = _ok(_shell("llmctl train --max_iters 2", work, env))
    assert "1024 tokens/step = 1 micro-step(s) x 2 x 512" in out.stdout + out.stderr
    records = [json.loads(line) for line in
               (work / "runs" / "llm_model" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "train" and r["step"] == 2 for r in records), records
    assert not (work / "runs" / "llm_model" / "latest").exists()  # save_model is off


def test_prepare_reports_every_unreachable_thing_at_once(offline) -> None:
    work, env = offline
    out = _shell("llmctl prepare tinystories --tokenizer cl100k_base", work, env, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    message = out.stderr
    assert "prepare cannot start (2 problems)" in message, message
    assert "tiktoken encoding 'cl100k_base'" in message
    assert "--tokenizer_file PATH/cl100k_base.tiktoken" in message  # its fix
    assert "roneneldan/TinyStories" in message and "--source DIR" in message  # its fix
    assert not (work / "data" / "tinystories").exists()
