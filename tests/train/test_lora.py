"""LoRA fine-tuning end to end: only adapters (and new token rows) train, adapter checkpoints
load transparently with their base's hash checked, merge-lora, exact resume after a kill."""

from __future__ import annotations

import signal

import pytest
import torch
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.core.errors import LlmctlError
from llmctl.infer.load import load_checkpoint
from llmctl.runtime.checkpoint import read_checkpoint, read_weights, save_checkpoint
from llmctl.runtime.distributed import DistEnv
from llmctl.runtime.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter
from llmctl.train.resume import resolve_run_config
from llmctl.train.trainer import Trainer

from .conftest import finetune_flags

pytest.importorskip("peft")

LORA = {"dataset": "chat", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.1,
        "learning_rate": 1e-2, "max_iters": 6, "save_model": True, "ckpt_interval": 3}


def _train(base, **extra) -> Trainer:
    run = resolve_run_config([], finetune_flags(base, **{**LORA, **extra}))
    trainer = Trainer(run, env=DistEnv(), verbose=False)
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def lora_run(finetune_base):
    return _train(finetune_base, file_name="lora_full", lora_targets="attention,mlp,lm_head")


def test_only_adapters_train_and_every_base_weight_is_unchanged(finetune_base, lora_run):
    base = read_weights(finetune_base["ckpt"])
    model = lora_run.raw_model
    lo, hi = lora_run.start.new_rows
    state = model.state_dict()
    for name, tensor in base.items():
        ours = state.get(name)
        if ours is None:  # wrapped by peft: the base layer holds it
            ours = state[name.replace(".weight", ".base_layer.weight")]
        if name in ("wte.weight", "lm_head.weight"):
            assert torch.equal(ours[:lo], tensor), name
            continue
        assert torch.equal(ours, tensor), name
    folder = lora_run.run_dir / "latest"
    config, tensors = read_adapter(folder)
    assert not (folder / "model.safetensors").exists()
    assert (folder / ADAPTER_WEIGHTS).is_file() and (folder / ADAPTER_CONFIG).is_file()
    b_weights = [t for n, t in tensors.items() if "lora_B" in n]
    assert b_weights and all(t.abs().max() > 0 for t in b_weights)  # moved from zero
    rows = tensors["added_token_rows"]
    assert rows.shape == (hi - lo, base["wte.weight"].shape[1])
    assert not torch.equal(rows, base["wte.weight"].mean(0).expand_as(rows))  # they trained
    raw = read_checkpoint(folder).raw
    assert raw["adapter"]["base"]["sha256"] == raw["init_from"]["sha256"]
    assert config["r"] == 4 and config["targets"] == ["attention", "mlp", "lm_head"]


def test_the_adapter_checkpoint_loads_transparently_and_refuses_a_changed_base(
        finetune_base, lora_run, tmp_path):
    import shutil

    folder = lora_run.run_dir / "latest"
    loaded = load_checkpoint(folder, device="cpu")
    x = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    lora_run.raw_model.eval()
    with torch.no_grad():
        want = lora_run.raw_model(x, use_cache=False).logits
        got = loaded.model(x, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # a base whose weights changed since: refused, naming the hashes
    base_copy = tmp_path / "base"
    shutil.copytree(finetune_base["ckpt"], base_copy)
    adapter_copy = tmp_path / "adapter"
    shutil.copytree(folder, adapter_copy)
    info = read_checkpoint(base_copy)
    weights = {k: v + 1e-3 for k, v in read_weights(base_copy).items()}
    save_checkpoint(base_copy, state_dict=weights, run=info.run, step=info.step,
                    tokenizer=info.tokenizer)
    raw = (adapter_copy / "config.json").read_text()
    (adapter_copy / "config.json").write_text(
        raw.replace(str(finetune_base["ckpt"].resolve()), str(base_copy)))
    with pytest.raises(LlmctlError, match="has changed"):
        load_checkpoint(adapter_copy, device="cpu")


@pytest.mark.parametrize("field, value, reason", [
    ("path", ["x"], "adapter.base.path must be a folder path"),
    ("path", 5, "adapter.base.path must be a folder path"),
    ("path", "x" * 5000, "adapter.base.path must be a folder path"),
    ("path", "x" * 300, "adapter.base.path cannot be a folder here"),
    ("sha256", 123, "adapter.base.sha256 must be 64 hex digits"),
])
def test_the_adapters_base_record_is_checked_as_data(lora_run, tmp_path, field, value, reason):
    """merge-lora, sample and eval read it: a wrong type was a traceback."""
    import json
    import shutil

    folder = tmp_path / "adapter"
    shutil.copytree(lora_run.run_dir / "latest", folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["adapter"]["base"][field] = value
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(LlmctlError, match=reason):
        load_checkpoint(folder, device="cpu")


def test_merge_lora_writes_a_plain_checkpoint_with_the_same_logits(finetune_base, tmp_path):
    trainer = _train(finetune_base, file_name="lora_merge", max_iters=2)
    folder = trainer.run_dir / "latest"
    runner = CliRunner()
    result = runner.invoke(app, ["merge-lora", str(folder), str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = load_checkpoint(tmp_path / "merged", device="cpu")
    adapted = load_checkpoint(folder, device="cpu")
    assert "adapter" not in merged.info.raw and (tmp_path / "merged/model.safetensors").exists()
    x = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged.model(x, use_cache=False).logits,
                                   adapted.model(x, use_cache=False).logits, atol=1e-5, rtol=0)
    # an adapter on the tied lm_head cannot become a plain checkpoint: said so
    head = runner.invoke(app, ["merge-lora", str(finetune_base["out"] / "lora_full"),
                               str(tmp_path / "m2")])
    assert head.exit_code == 2 and "tied to the token embedding" in head.output


@pytest.mark.slow
def test_a_killed_lora_run_resumes_to_the_same_adapters(finetune_base, lora_run,
                                                         llmctl_train, cli_args):
    flags = finetune_flags(finetune_base, **LORA, file_name="lora_killed",
                           lora_targets="attention,mlp,lm_head")
    proc = llmctl_train(flags)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "saved latest checkpoint at step 3" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    killed = lora_run.run_dir.parent / "lora_killed"
    assert read_checkpoint(killed / "latest").step == 3
    flags = {k: v for k, v in flags.items() if k != "init_from"}
    run = resolve_run_config([], {**flags, "resume": "auto"})
    resumed = Trainer(run, env=DistEnv(), verbose=False)
    resumed.fit()
    _, want = read_adapter(lora_run.run_dir / "latest")
    _, got = read_adapter(killed / "latest")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
