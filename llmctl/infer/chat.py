"""Multi-turn chat with a checkpoint trained on chat data (`prepare --format chat`).

The prompt is the conversation so far in the training template, then `<|assistant|>`; the
reply is sampled (KV cache) until `<|endofturn|>` (or end-of-text, or the model opening
another turn). When the conversation outgrows the context, the oldest turns are dropped
(a system message is kept), leaving room for the reply.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..core.errors import LlmctlError
from ..data.chat import ASSISTANT, END_OF_TURN, ROLE_TOKENS, USER, Message, encode_messages
from ..data.tokenizers import ExtendedTokenizer
from .sample import IncrementalDecoder, SampleSettings

if TYPE_CHECKING:
    from .load import LoadedCheckpoint


def chat_tokenizer_of(loaded: LoadedCheckpoint) -> ExtendedTokenizer:
    tok = loaded.tokenizer
    if not isinstance(tok, ExtendedTokenizer) or not all(
            t in tok.added_ids for t in (USER, ASSISTANT, END_OF_TURN)):
        raise LlmctlError(f"{loaded.info.path} was not trained on chat data: its tokenizer has "
                          f"no {USER} / {ASSISTANT} / {END_OF_TURN} tokens; fine-tune it on a "
                          "`llmctl prepare --format chat` dataset first")
    return tok


@dataclass
class ChatSession:
    loaded: LoadedCheckpoint
    settings: SampleSettings
    system: str | None = None
    history: list[Message] = field(default_factory=list)
    cropped_turns: int = 0  # messages dropped so far to fit block_size

    def __post_init__(self) -> None:
        import torch

        self.tokenizer = chat_tokenizer_of(self.loaded)
        self.settings.check()
        if self.settings.seed is None:
            self.settings.seed = secrets.randbits(63)
        if self.system and ROLE_TOKENS["system"] not in self.tokenizer.added_ids:
            raise LlmctlError("this checkpoint's chat data had no system messages (no "
                              "<|system|> token); drop --system")
        if self.system:  # refused now, not as if the first user turn were at fault
            try:
                encode_messages(self.tokenizer, [Message("system", self.system)])
            except LlmctlError as err:
                raise LlmctlError(f"--system: {err}") from None
        self.generator = torch.Generator(device=self.loaded.device).manual_seed(
            self.settings.seed)
        self.stop_ids = {self.tokenizer.eot_id, *self.tokenizer.added_ids.values()}
        self._decoder = None  # the fast decoding step, made at the first reply
        self.reset()

    def reset(self) -> None:
        self.history = [Message("system", self.system)] if self.system else []

    def _budget(self) -> int:
        """Prompt tokens allowed: block_size minus room for the reply."""
        block = self.loaded.block_size
        return max(1, block - min(self.settings.max_new_tokens, block // 2))

    def prompt_ids(self) -> list[int]:
        """The conversation in the template, then <|assistant|>; oldest turns dropped to fit."""
        opener = [self.tokenizer.token_id(ASSISTANT)]
        while True:
            ids, _ = encode_messages(self.tokenizer, self.history)
            ids += opener
            first = 1 if self.history and self.history[0].role == "system" else 0
            if len(ids) <= self._budget() or len(self.history) - first <= 1:
                return ids[-self._budget():]  # one turn longer than the budget: its end
            del self.history[first]
            self.cropped_turns += 1

    def check_turn(self, text: str) -> None:
        """An LlmctlError if the tokenizer cannot encode `text` as a user turn."""
        encode_messages(self.tokenizer, [Message("user", text)])

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add the user's turn, sample and return the assistant's, streamed to on_text. A turn
        the tokenizer refuses (an LlmctlError) leaves the conversation as it was."""
        import torch

        from .decode import stream_tokens
        from .fastpath import FastDecoder, supports

        model = self.loaded.model
        if self._decoder is None and supports(model):  # its weight copies serve every turn
            self._decoder = FastDecoder(model, total_tokens=self.loaded.block_size)
        self.history.append(Message("user", text))
        try:
            prompt = self.prompt_ids()
        except LlmctlError:  # kept, it would fail every later turn too
            self.history.pop()
            raise
        idx = torch.tensor([prompt], dtype=torch.long, device=self.loaded.device)
        s = self.settings
        decoder = IncrementalDecoder(self.tokenizer.decode)
        pieces: list[str] = []
        with self.loaded.precision.autocast():
            for token in stream_tokens(model, idx, s.max_new_tokens,
                                       temperature=s.temperature, top_k=s.top_k,
                                       top_p=s.top_p, generator=self.generator,
                                       eot_id=self.tokenizer.token_id(END_OF_TURN),
                                       vocab_limit=self.tokenizer.vocab_size,
                                       decoder=self._decoder):
                token_id = int(token[0])
                if token_id in self.stop_ids:
                    break
                piece = decoder.push(token_id)
                if piece:
                    pieces.append(piece)
                    if on_text is not None:
                        on_text(piece)
        piece = decoder.flush()
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
        answer = "".join(pieces)
        self.history.append(Message("assistant", answer))
        return answer
