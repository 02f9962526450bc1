"""Hostile input through the real CLI (issue 17): each child runs under a 2 GiB address-space
limit and a 60 s timeout, and must end with exit 2, a message naming the problem, no
traceback, and nothing written or lost."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow

MEMORY_LIMIT = 2 << 30  # address space of each child: a runaway read dies, it is not waited for
TIMEOUT = 60

@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_cli(*args: Any, cwd: Path | None = None, stdin: Any = subprocess.DEVNULL,
            timeout: float = TIMEOUT) -> Result:
    """`python -m llmctl ARGS` in a child limited to MEMORY_LIMIT bytes and `timeout` s."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "llmctl", *map(str, args)], cwd=cwd,
                          stdin=stdin, capture_output=True, text=True, timeout=timeout,
                          env=env, preexec_fn=_limit_memory)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_refused(result: Result, *needles: str) -> None:
    """Exit 2 with a message naming the problem, and no traceback."""
    assert result.code == 2, (result.code, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr[-2000:])


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under `folder`: nothing written or lost."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}



def _symlink(tmp_path: Path, name: str, target: str) -> Path:
    link = tmp_path / name
    link.symlink_to(target)
    return link


def _alias_bomb(path: Path) -> Path:
    lines = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    lines.append("model: {n_layer: *i}")
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- files that never end


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_symlinked_to_a_device(tmp_path, device, suffix):
    cfg = _symlink(tmp_path, "cfg" + suffix, device)
    assert_refused(run_cli("validate-config", "-c", cfg), str(cfg), "character device",
                   "not a regular file")


def test_config_fifo_does_not_block(tmp_path):
    fifo = tmp_path / "cfg.yaml"
    os.mkfifo(fifo)
    assert_refused(run_cli("validate-config", "-c", fifo, timeout=30), "FIFO")


def test_layer_configs_jsonl_device(tmp_path):
    assert_refused(run_cli("validate-config", "--layer_configs_jsonl", "/dev/zero"),
                   "/dev/zero", "character device")


def test_prompt_file_and_eval_text_devices(trained, tmp_path):
    ckpt = trained["ckpt"]
    before = tree(ckpt.parent)
    for device in ("/dev/zero", "/dev/urandom"):
        link = _symlink(tmp_path, f"prompt{device.replace('/', '_')}.txt", device)
        assert_refused(run_cli("sample", ckpt, "--prompt_file", link), "prompt file",
                       "character device")
    assert_refused(run_cli("eval", ckpt, "--text", "/dev/zero"), "text file",
                   "character device")
    fifo = tmp_path / "prompt.fifo"
    os.mkfifo(fifo)
    assert_refused(run_cli("sample", ckpt, "--prompt_file", fifo, timeout=30), "FIFO")
    assert tree(ckpt.parent) == before


def test_prompt_on_stdin_is_bounded(trained):
    with open("/dev/zero", "rb") as zero:
        assert_refused(run_cli("sample", trained["ckpt"], "--prompt_file", "-", stdin=zero),
                       "prompt file on stdin", "larger than 16.00 MiB")


def test_oversized_config_file(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (17 << 20) + "\n")
    assert_refused(run_cli("validate-config", "-c", big), "larger than 16.00 MiB")


# ---------------------------------------------------------------- shapes that explode


def test_yaml_alias_bomb(tmp_path):
    start = time.monotonic()
    assert_refused(run_cli("validate-config", "-c", _alias_bomb(tmp_path / "bomb.yaml")),
                   "alias bomb")
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("depth", [40, 20_000])
def test_deeply_nested_layer_configs(tmp_path, depth):
    deep = "[" * depth + "]" * depth
    assert_refused(run_cli("validate-config", "--layer_configs", deep), "model.layer_configs",
                   "nested more than 32 levels")
    jsonl = tmp_path / "layers.jsonl"
    jsonl.write_text(json.dumps({"attn": "mha"}) + "\n" + deep + "\n")
    assert_refused(run_cli("validate-config", "--layer_configs_jsonl", jsonl),
                   f"{jsonl}:2", "nested")
    nested = tmp_path / "deep.json"
    nested.write_text('{"model": ' + deep + "}")
    assert_refused(run_cli("validate-config", "-c", nested), "nested")


def test_huge_value_is_previewed(tmp_path):
    cfg = tmp_path / "long.json"
    cfg.write_text(json.dumps({"n_layer": [12345678] * 200_000, "attn": "x" * 1_000_000}))
    result = run_cli("validate-config", "-c", cfg)
    assert_refused(result, "n_layer", "expected an integer", "attn")
    assert len(result.stderr) < 2000


# ---------------------------------------------------------------- numbers


@pytest.mark.parametrize("temperature", ["inf", "1e308", "1e-45"])
def test_sample_temperature_out_of_range(trained, temperature):
    assert_refused(run_cli("sample", trained["ckpt"], "--temperature", temperature,
                           "--max_new_tokens", "3"), "temperature must be 0 (greedy) or in")


def test_sample_top_p_out_of_range(trained):
    result = run_cli("sample", trained["ckpt"], "--top_p", "nan", "--max_new_tokens", "3")
    assert_refused(result, "top_p")


def test_eval_batch_size_that_cannot_fit(trained):
    result = run_cli("eval", trained["ckpt"], "--batch_size", "100000000")
    assert_refused(result, "--batch_size 100000000", "needs about", "is available",
                   "logits")


def test_prepare_num_proc_is_capped(trained, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Hello there, friend. " * 2000)
    result = run_cli("prepare", "--source", corpus, "--name", "c", "--data_dir",
                     tmp_path / "data", "--tokenizer", "char", "--num_proc", "100000", "-q")
    assert result.code == 0, result.stderr
    assert "note: --num_proc 100000 is more than the" in result.stderr


def test_prepare_source_device_and_fifo(tmp_path):
    data = tmp_path / "data"
    assert_refused(run_cli("prepare", "--source", "/dev/zero", "--max_tokens", "1000",
                           "--name", "z", "--data_dir", data), "/dev/zero", "character device")
    fifo = tmp_path / "text.fifo"
    os.mkfifo(fifo)
    assert_refused(run_cli("prepare", "--source", fifo, "--tokenizer", "char", "--name", "f",
                           "--data_dir", data, timeout=30), "FIFO")
    assert not data.exists() or not any(data.iterdir())


def test_prepare_tokenizer_file_device_and_fifo(tmp_path):
    """The tokenizer file is fingerprinted before any work: with the bounded reader."""
    data = tmp_path / "data"
    fifo = tmp_path / "ranks.fifo"
    os.mkfifo(fifo)
    for path, kind in ((_symlink(tmp_path, "ranks", "/dev/zero"), "character device"),
                       (fifo, "FIFO")):
        assert_refused(run_cli("prepare", "shakespeare", "--tokenizer_file", path,
                               "--data_dir", data, timeout=30), "tokenizer file", kind)


def test_dataset_meta_json_that_never_ends(tmp_path):
    """A prepared dataset's meta.json is read with a bound: a FIFO there is refused."""
    folder = tmp_path / "data" / "odd"
    folder.mkdir(parents=True)
    os.mkfifo(folder / "meta.json")
    assert_refused(run_cli("train", "--dataset", "odd", "--data_dir", tmp_path / "data",
                           "--out_dir", tmp_path / "out", "--max_iters", "1", timeout=30),
                   "meta.json", "FIFO", "--force")


class _CountingPattern:
    """The cut regex, counting the characters each search may scan."""

    def __init__(self, pattern):
        self.pattern, self.scanned = pattern, 0

    def search(self, text, pos=0, endpos=None):
        self.scanned += (len(text) if endpos is None else endpos) - pos
        return self.pattern.search(text, pos, len(text) if endpos is None else endpos)

    def finditer(self, text, pos=0, endpos=None):
        self.scanned += (len(text) if endpos is None else endpos) - pos
        return self.pattern.finditer(text, pos, len(text) if endpos is None else endpos)


@pytest.mark.parametrize("line", ["word" * 2_000_000, "\x00" * 8_000_000],
                         ids=["words", "nul"])
def test_text_without_cut_points_is_linear(tmp_path, monkeypatch, line):
    """One 8 MB line with no safe cut point is searched about once, not once per read."""
    from llmctl.data.sources import text as text_source

    path = tmp_path / "line.txt"
    path.write_text(line)
    counting = _CountingPattern(text_source._CUT)
    monkeypatch.setattr(text_source, "_CUT", counting)
    pieces = list(text_source.text_file_pieces(path))
    assert "".join(p[0] for p in pieces) == line
    assert counting.scanned <= 2 * len(line), counting.scanned  # was ~5x at 8 MB, quadratic


def test_prepare_max_tokens_on_a_line_without_cut_points(tmp_path):
    line = tmp_path / "line.txt"
    line.write_text("word" * 2_000_000)
    start = time.monotonic()
    result = run_cli("prepare", "--source", line, "--name", "l", "--data_dir",
                     tmp_path / "data", "--tokenizer", "char", "--max_tokens", "1000", "-q",
                     "--json")
    assert result.code == 0, result.stderr
    meta = json.loads(result.stdout)
    assert sum(s["tokens"] for s in meta["splits"].values()) == 1000
    assert time.monotonic() - start < 60


# ---------------------------------------------------------------- checkpoints as data


def _bad_shape(opt: dict) -> None:
    opt["state"]["wte.weight"]["exp_avg"] = torch.zeros(3, 3)
    opt["state"]["wte.weight"]["exp_avg_sq"] = torch.zeros(3, 3)


BROKEN = {
    "step_lots": ({"config": lambda c: c.update(step="lots")}, "config.json: field 'step'"),
    "step_negative": ({"config": lambda c: c.update(step=-3)}, "config.json: field 'step'"),
    "metrics_string": ({"config": lambda c: c.update(metrics={"loss": "low"})},
                       "field 'metrics.loss'"),
    "tokenizer_list": ({"config": lambda c: c.update(tokenizer=[1])}, "field 'tokenizer'"),
    "special_tokens_list": ({"config": lambda c: c["tokenizer"].update(
        special_tokens=["<|endoftext|>"])}, "config.json: the tokenizer is not valid: "
        "tokenizer.special_tokens"),
    "rng_x": ({"state": lambda s: s.update(rng="x")}, "trainer_state.json: field 'rng'"),
    "best_val_x": ({"state": lambda s: s.update(best_val="x")}, "field 'best_val'"),
    "elapsed_inf": ({"state": lambda s: s.update(elapsed=float("inf"))}, "field 'elapsed'"),
    "world_size_0": ({"state": lambda s: s.update(world_size=0)}, "field 'world_size'"),
    "sampler_seed": ({"state": lambda s: s["sampler"].update(samples_drawn="many")},
                     "field 'sampler.samples_drawn'"),
    "torch_rng": ({"state": lambda s: s["rng"][0].update(torch="AAAA")},
                  "field 'rng[0].torch'"),
    "wrong_shape": ({"optimizer": _bad_shape}, "optimizer.pt: field 'state[wte.weight].exp_avg'"),
    "wrong_groups": ({"optimizer": lambda o: o["param_groups"].pop()}, "param_groups"),
    "wrong_step": ({"optimizer": lambda o: o["state"]["wte.weight"].update(
        step=torch.tensor(float("nan")))}, "state[wte.weight].step"),
}
CONFIG_ROWS = ["step_lots", "step_negative", "metrics_string", "tokenizer_list",
               "special_tokens_list"]


@pytest.mark.parametrize("row", ["step_lots"])  # the issue's row; the class in-process below
def test_bad_config_json_in_sample_eval_inspect(broken, row):
    edits, needle = BROKEN[row]
    ckpt = broken(**edits)
    before = tree(ckpt)
    for args in (("sample", ckpt, "--max_new_tokens", "2"), ("eval", ckpt),
                 ("inspect-params", ckpt)):
        assert_refused(run_cli(*args), needle)
    assert tree(ckpt) == before


# the issue's rows through the CLI; every row of BROKEN is also checked in-process below
RESUME_ROWS = ["rng_x", "best_val_x", "wrong_shape"]


@pytest.mark.parametrize("row", RESUME_ROWS)
def test_bad_training_state_on_resume(broken, trained, tmp_path, row):
    edits, needle = BROKEN[row]
    ckpt = broken(**edits)
    before = tree(ckpt)
    out = tmp_path / "runs"
    result = run_cli("train", "--resume", ckpt, "--data_dir", trained["data"], "--out_dir",
                     out, "--max_iters", "4")
    assert_refused(result, needle)
    assert tree(ckpt) == before
    # nothing written for the new run but the run folder's lock file (empty of records)
    assert [p.name for p in out.rglob("*") if p.is_file()] in ([], [".lock"])
    if "state" in edits:  # eval reads trainer_state.json too (the run's world size)
        assert_refused(run_cli("eval", ckpt), needle)


@pytest.mark.parametrize("row", [r for r in BROKEN if r not in CONFIG_ROWS])
def test_every_bad_training_state_is_named(broken, trained, row):
    """The whole class, in-process: each broken field is refused with its name, before any
    optimizer.load_state_dict (the resume path calls exactly these checks)."""
    from llmctl.core.errors import LlmctlError
    from llmctl.model import LLM
    from llmctl.runtime.checkpoint import OPTIMIZER, load_training_state, read_checkpoint
    from llmctl.runtime.checkpoint_data import check_optimizer_state
    from llmctl.train.optim import build_optimizer

    edits, needle = BROKEN[row]
    ckpt = broken(**edits)
    with pytest.raises(LlmctlError) as caught:
        opt_state, _ = load_training_state(ckpt)
        info = read_checkpoint(ckpt)
        model = LLM(info.run.model)
        optimizer = build_optimizer(model, info.run.train, torch.device("cpu"))
        check_optimizer_state(opt_state, model, optimizer, ckpt / OPTIMIZER)
    assert needle in str(caught.value)


def test_good_training_state_passes(trained):
    from llmctl.model import LLM
    from llmctl.runtime.checkpoint import OPTIMIZER, load_training_state, read_checkpoint
    from llmctl.runtime.checkpoint_data import check_optimizer_state
    from llmctl.train.optim import build_optimizer

    opt_state, state = load_training_state(trained["ckpt"])
    info = read_checkpoint(trained["ckpt"])
    model = LLM(info.run.model)
    optimizer = build_optimizer(model, info.run.train, torch.device("cpu"))
    check_optimizer_state(opt_state, model, optimizer, trained["ckpt"] / OPTIMIZER)
    optimizer.load_state_dict(opt_state)  # what the check let through loads
    assert state["rng"] and info.step == 2


@pytest.mark.parametrize("temperature", [float("nan"), -1.0, 1e-4, 101.0, float("-inf")])
def test_every_bad_temperature_is_refused(temperature):
    from llmctl.core.errors import LlmctlError
    from llmctl.infer.sampling import check_sampling

    with pytest.raises(LlmctlError, match="temperature must be 0"):
        check_sampling(temperature, None, None)
    check_sampling(0.0, None, None)
    check_sampling(1e-3, 5, 0.5)
    check_sampling(100.0, None, 1.0)


@pytest.mark.parametrize("row", CONFIG_ROWS)
def test_every_bad_config_json_is_named(broken, row):
    """read_checkpoint is what sample, eval, inspect-params and resume all read through."""
    from llmctl.core.errors import LlmctlError
    from llmctl.runtime.checkpoint import read_checkpoint

    edits, needle = BROKEN[row]
    with pytest.raises(LlmctlError) as caught:
        read_checkpoint(broken(**edits))
    assert needle in str(caught.value)


# ---------------------------------------------------------------- checkpoint files by size


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor],
                       declared: dict[str, tuple[str, list[int], int]],
                       metadata: dict[str, str]) -> None:
    """A safetensors file by hand: `tensors` stored, then each `declared` (dtype, shape,
    bytes) tensor as a sparse hole of its size (nothing on disk, everything on read)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name, t in tensors.items():
        blob = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    for name, (dtype, shape, size) in declared.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))
        f.truncate(8 + len(raw) + offset)


def _rewrite_weights(folder: Path, declared: dict, metadata: dict[str, str] | None = None) -> None:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        tensors = {name: f.get_tensor(name).float() for name in f.keys()}  # noqa: SIM118
        stored_metadata = f.metadata() or {}
    _write_safetensors(folder / "model.safetensors", tensors, declared,
                       {**stored_metadata, **(metadata or {})})


def test_weights_with_a_huge_extra_tensor_are_refused_unread(broken):
    """An extra 8 GiB tensor in model.safetensors: refused from the header (unread, the
    child's 2 GiB address space would not hold it), every mismatch named."""
    ckpt = broken()
    _rewrite_weights(ckpt, {"extra": ("F32", [1 << 16, 1 << 15], 8 << 30)})
    before = tree(ckpt)
    for args in (("sample", ckpt, "--max_new_tokens", "2"), ("eval", ckpt)):
        assert_refused(run_cli(*args), "do not fit the model", "unexpected extra")
    assert tree(ckpt) == before


@pytest.mark.parametrize("aliases", ['["x"]', '{"lm_head.weight": "nowhere"}', "{not json"])
def test_weights_with_bad_alias_metadata(broken, aliases):
    ckpt = broken()
    _rewrite_weights(ckpt, {}, {"aliases": aliases})
    assert_refused(run_cli("sample", ckpt, "--max_new_tokens", "2"), "model.safetensors")


def test_weights_of_a_wrong_dtype(broken):
    from llmctl.core.errors import LlmctlError
    from llmctl.runtime.checkpoint import read_weights

    ckpt = broken()
    _rewrite_weights(ckpt, {"extra": ("I64", [2], 16)})
    with pytest.raises(LlmctlError, match="extra: dtype I64 is not a float"):
        read_weights(ckpt)


def test_optimizer_state_larger_than_its_weights_allow(broken, trained, tmp_path):
    from llmctl.runtime.checkpoint import OPTIMIZER_SIZE_FACTOR, OPTIMIZER_SLACK

    ckpt = broken()
    stored = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    limit = OPTIMIZER_SIZE_FACTOR * stored + OPTIMIZER_SLACK
    os.truncate(ckpt / "optimizer.pt", limit + 1)  # sparse: costs no disk
    result = run_cli("train", "--resume", ckpt, "--data_dir", trained["data"], "--out_dir",
                     tmp_path / "runs", "--max_iters", "4")
    assert_refused(result, "optimizer.pt holds", f"at most {limit:,}")


def test_optimizer_state_that_is_a_fifo(broken, trained, tmp_path):
    ckpt = broken()
    (ckpt / "optimizer.pt").unlink()
    os.mkfifo(ckpt / "optimizer.pt")
    result = run_cli("train", "--resume", ckpt, "--data_dir", trained["data"], "--out_dir",
                     tmp_path / "runs", "--max_iters", "4")
    assert_refused(result, "optimizer.pt is not a regular file")
