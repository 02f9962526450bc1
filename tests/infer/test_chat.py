"""llmctl chat: piped stdin answers each turn and exits; the history is cropped from the
oldest turn; the turns share one fast decoder; checkpoints without chat tokens are refused."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.core.errors import LlmctlError
from llmctl.core.files import PROMPT_LIMIT
from llmctl.data.chat import Message
from llmctl.infer.chat import ChatSession
from llmctl.infer.load import load_checkpoint
from llmctl.infer.sample import SampleSettings


@pytest.fixture(scope="module")
def chat_ckpt(finetune_base):
    """A full fine-tune of the base on the chat data (2 steps: the template, not quality)."""
    from llmctl.train.resume import resolve_run_config
    from llmctl.train.trainer import train

    from ..train.conftest import finetune_flags

    run = resolve_run_config([], finetune_flags(finetune_base, dataset="chat", max_iters=2,
                                                file_name="chat_full", save_model=True))
    return train(run, verbose=False).run_dir / "latest"


@pytest.fixture(scope="module")
def finetune_base(char_dataset, tmp_path_factory):
    from ..train import conftest

    return conftest.finetune_base.__wrapped__(char_dataset, tmp_path_factory)


def test_chat_through_stdin_answers_twice_and_exits(chat_ckpt):
    result = CliRunner().invoke(app, ["chat", str(chat_ckpt), "--seed", "3",
                                      "--max_new_tokens", "12", "--device", "cpu"],
                                input="Good morrow!\n/reset\nAnd of up?\n/exit\nnot read\n")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    users = [line for line in lines if line.startswith("user: ")]
    answers = [line for line in lines if line.startswith("assistant: ")]
    assert users == ["user: Good morrow!", "user: And of up?"]
    assert len(answers) == 2
    assert "not read" not in result.stdout
    # same seed, same replies
    again = CliRunner().invoke(app, ["chat", str(chat_ckpt), "--seed", "3",
                                     "--max_new_tokens", "12", "--device", "cpu"],
                               input="Good morrow!\n/reset\nAnd of up?\n")
    assert again.exit_code == 0 and again.stdout == result.stdout


def test_the_history_is_cropped_from_the_oldest_turn(chat_ckpt):
    loaded = load_checkpoint(chat_ckpt, device="cpu")
    session = ChatSession(loaded, SampleSettings(max_new_tokens=8, temperature=0, seed=0))
    session.history = [Message("user", "a" * 6), Message("assistant", "b" * 6)] * 4
    session.history.append(Message("user", "last"))
    ids = session.prompt_ids()
    assert len(ids) <= loaded.block_size - 8
    assert session.cropped_turns > 0
    text = loaded.tokenizer.decode(ids)
    assert text.endswith("<|user|>last<|endofturn|><|assistant|>")
    assert text.startswith("<|")  # whole turns were dropped, not a cut in the middle


def test_replies_share_one_decoder_and_match_a_fresh_session(chat_ckpt):
    loaded = load_checkpoint(chat_ckpt, device="cpu")
    session = ChatSession(loaded, SampleSettings(max_new_tokens=8, temperature=0, seed=0))
    session.reply("Good morrow!")
    decoder = session._decoder
    layers = decoder._layers  # the weight copies of the first turn
    second = session.reply("And of up?")
    assert session._decoder is decoder and decoder._layers is layers
    assert decoder.cache is None  # no KV cache held between turns
    fresh = ChatSession(loaded, SampleSettings(max_new_tokens=8, temperature=0, seed=0))
    fresh.history = session.history[:2]
    assert fresh.reply("And of up?") == second


def test_a_checkpoint_without_chat_tokens_is_refused(finetune_base):
    loaded = load_checkpoint(finetune_base["ckpt"], device="cpu")
    with pytest.raises(LlmctlError, match="not trained on chat data"):
        ChatSession(loaded, SampleSettings())


@pytest.mark.parametrize("stdin, needle", [
    ("Good morrow!\n\u2603\n", "stdin line 2: text has characters outside the char vocabulary"),
    (b"\xff\xfe\x80\n", "stdin line 1"),  # not UTF-8
    ("a" * (PROMPT_LIMIT + 1) + "\n", "stdin line 1 is longer than 16,777,216 characters"),
])
def test_a_bad_line_on_stdin_is_refused_by_its_number(chat_ckpt, stdin, needle):
    result = CliRunner().invoke(app, ["chat", str(chat_ckpt), "--max_new_tokens", "2",
                                      "--device", "cpu"], input=stdin)
    assert result.exit_code == 2, (result.exception, result.output[-500:])
    assert isinstance(result.exception, SystemExit)  # a message, not a traceback
    assert needle in result.output


def test_a_refused_turn_leaves_the_conversation_as_it_was(chat_ckpt):
    session = ChatSession(load_checkpoint(chat_ckpt, device="cpu"),
                          SampleSettings(max_new_tokens=2, temperature=0, seed=0))
    session.reply("Good morrow!")
    before = list(session.history)
    with pytest.raises(LlmctlError, match="outside the char vocabulary"):
        session.reply("\u2603")
    assert session.history == before
    session.reply("And of up?")  # the next turn is not poisoned by the refused one
