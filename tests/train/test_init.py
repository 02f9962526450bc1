"""train --init_from: the first step starts exactly from the source's weights, shape changes
are refused, a vocabulary grown for chat tokens keeps every old row bitwise."""

from __future__ import annotations

import json

import pytest
import torch

from llmctl.core.errors import LlmctlError
from llmctl.data.loader import PreparedDataset
from llmctl.data.prepare import PrepareOptions, prepare_dataset
from llmctl.infer.evaluate import EvalRequest, evaluate_checkpoint
from llmctl.infer.load import load_checkpoint
from llmctl.runtime.base_weights import weights_sha256
from llmctl.runtime.checkpoint import read_checkpoint, read_weights
from llmctl.train.resume import resolve_run_config
from llmctl.train.trainer import Trainer, train

from .conftest import finetune_flags, read_records


@pytest.fixture
def base(finetune_base) -> dict:
    return finetune_base


def _flags(base: dict, **extra) -> dict:
    return finetune_flags(base, **extra)


def test_first_step_loss_equals_eval_of_the_source_on_the_same_batch(base):
    run = resolve_run_config([], _flags(base, max_iters=1, file_name="first", save_model=True))
    assert run.grad_accum_steps() == 1
    result = train(run, verbose=False)
    first = read_records(result.run_dir)[0]["loss"]
    # eval of the source on the trainer's first batch: the train split, the run's seed
    loaded = load_checkpoint(base["ckpt"], device="cpu")
    report = evaluate_checkpoint(loaded, EvalRequest(split="train", eval_iters=1,
                                                     batch_size=run.train.batch_size,
                                                     seed=run.train.seed))
    assert first == pytest.approx(report.loss, abs=1e-5)
    # ... and the run is not a copy of the source: the step moved the weights
    new = read_weights(result.run_dir / "latest")
    old = read_weights(base["ckpt"])
    assert any(not torch.equal(new[k], old[k]) for k in old)
    saved = read_checkpoint(result.run_dir / "latest").raw
    assert saved["init_from"]["path"] == str(base["ckpt"].resolve())
    assert saved["init_from"]["sha256"] == weights_sha256(base["ckpt"])
    assert saved["step"] == 1  # a fresh step counter


def test_a_shape_changing_flag_is_refused_with_every_difference(base):
    with pytest.raises(LlmctlError) as err:
        resolve_run_config([], _flags(base, n_embd=64, up_dim=128, file_name="x"))
    text = str(err.value)
    assert "n_embd: checkpoint 32, now 64" in text
    assert "layers[0].up_dim: checkpoint 64, now 128" in text
    # dropout and training keys may change
    run = resolve_run_config([], _flags(base, dropout=0.2, learning_rate=1e-4, file_name="y"))
    assert run.model.dropout == 0.2 and run.model.n_embd == 32


def test_resume_and_init_from_are_exclusive_and_hf_is_imported_by_the_cli(base):
    with pytest.raises(LlmctlError, match="give one of them"):
        resolve_run_config([], _flags(base, resume="auto"))
    with pytest.raises(LlmctlError, match="imported by the llmctl command line"):
        resolve_run_config([], _flags(base, init_from="hf:gpt2"))


def test_a_foreign_tokenizer_is_refused(base, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world " * 400, encoding="utf-8")
    prepare_dataset(PrepareOptions(source=str(corpus), name="bytes", data_dir=base["data"],
                                   tokenizer="byte", progress=False, num_proc=1))
    with pytest.raises(LlmctlError, match="tokenized with byte"):
        resolve_run_config([], _flags(base, dataset="bytes", vocab_size=None))


def test_a_grown_vocabulary_keeps_the_old_rows_bitwise(base):
    from llmctl.runtime.distributed import DistEnv

    run = resolve_run_config([], _flags(base, dataset="chat", file_name="grow", max_iters=1))
    lo = PreparedDataset(base["data"] / "tiny").vocab_size  # the first new id
    assert run.model.vocab_size == lo + 3  # <|user|>, <|assistant|>, <|endofturn|>
    trainer = Trainer(run, env=DistEnv(), verbose=False)
    trainer._setup()
    old = read_weights(base["ckpt"])["wte.weight"]  # (lo, C)
    new = trainer.raw_model.wte.weight.detach()  # (lo + 3, C)
    assert old.shape[0] == lo and new.shape == (lo + 3, old.shape[1])
    assert torch.equal(new[:lo], old)
    mean = old.mean(dim=0)
    for row in range(lo, lo + 3):  # the new tokens start from the mean embedding
        assert torch.equal(new[row], mean)
    assert trainer.raw_model.lm_head.weight is trainer.raw_model.wte.weight
    assert trainer.start.new_rows == (lo, lo + 3)


def test_validate_config_resolves_init_from_like_train(base):
    from typer.testing import CliRunner

    from llmctl.cli import app

    from .conftest import as_args

    flags = _flags(base, dataset="chat", file_name="v")
    result = CliRunner().invoke(app, ["validate-config", *as_args(flags), "--json"])
    assert result.exit_code == 0, result.output
    model = json.loads(result.stdout)["model"]
    assert model["n_embd"] == 32 and model["vocab_size"] == PreparedDataset(
        base["data"] / "chat").vocab_size  # grown for the chat tokens
    bad = CliRunner().invoke(app, ["validate-config", *as_args({**flags, "n_embd": 64})])
    assert bad.exit_code == 2 and "n_embd: checkpoint 32, now 64" in bad.output
