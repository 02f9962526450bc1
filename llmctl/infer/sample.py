"""`llmctl sample`'s logic: prompt → token ids → streamed, incrementally decoded samples."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..core.errors import LlmctlError

if TYPE_CHECKING:
    from .load import LoadedCheckpoint

# A token that ends mid-character decodes to U+FFFD until the rest of its bytes arrive;
# past this many held-back tokens the bytes are genuinely invalid and are emitted as they are.
_MAX_PENDING_TOKENS = 8
_REPLACEMENT = "\ufffd"


MAX_NEW_TOKENS = 10_000_000  # tokens one sample may generate


@dataclass
class SampleSettings:
    max_new_tokens: int = 300
    temperature: float = 0.9  # 0 = greedy
    top_k: int | None = 200  # None / 0 = off
    top_p: float | None = None  # None / 1 = off
    num_samples: int = 1
    seed: int | None = None  # None: a fresh random seed, reported back
    stop_at_eot: bool = True
    speculative: bool = False  # draft with the MTP modules, verify with the main model

    def check(self) -> None:
        from .sampling import check_sampling

        if not 0 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise LlmctlError(f"max_new_tokens must be in [0, {MAX_NEW_TOKENS:,}] (the token "
                              f"history is kept in memory), got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise LlmctlError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise LlmctlError(f"seed must be in [0, 2**63), got {self.seed}")
        check_sampling(self.temperature, self.top_k, self.top_p)


@dataclass
class PromptTokens:
    text: str  # the prompt as given
    ids: list[int]  # what the model is fed (cropped to block_size; [eot] for an empty prompt)
    dropped: int = 0  # leading tokens cropped away to fit block_size


@dataclass
class Sample:
    index: int
    text: str  # the generated continuation (the prompt not included)
    token_ids: list[int]
    stop_reason: str  # "eot" or "max_new_tokens"
    seconds: float
    # speculative only: acceptance stats, and plain decoding's time for as many tokens
    speculative: dict[str, Any] | None = None

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens": len(self.token_ids),
                "tokens_per_s": round(self.tokens_per_s, 2)}


@dataclass
class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces that never split a character.

    Each piece is the text difference since the last one; tokens that end inside a multi-byte
    character are held back until it is complete, so "".join(pieces) == decode(all ids)."""

    decode: Callable[[list[int]], str]
    pending: list[int] = field(default_factory=list)

    def push(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.decode(self.pending)
        if text.endswith(_REPLACEMENT) and len(self.pending) < _MAX_PENDING_TOKENS:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


def encode_prompt(tokenizer: Any, text: str, block_size: int) -> PromptTokens:
    """Prompt ids: empty → [end-of-text]; longer than block_size → its last block_size."""
    ids = list(tokenizer.encode(text)) if text else []
    if not ids:
        if tokenizer.eot_id is None:
            raise LlmctlError("empty prompt, and the checkpoint's tokenizer has no "
                              "end-of-text token to start from; give a --prompt")
        return PromptTokens(text=text, ids=[int(tokenizer.eot_id)])
    dropped = max(0, len(ids) - block_size)
    return PromptTokens(text=text, ids=ids[dropped:], dropped=dropped)


def generate_samples(loaded: LoadedCheckpoint, prompt: PromptTokens, settings: SampleSettings,
                     on_text: Callable[[int, str], None] | None = None) -> Iterator[Sample]:
    """Sample `settings.num_samples` continuations of `prompt`, decoded as one batch.

    `on_text(index, piece)` receives each sample's text: sample 0's as it is generated, the
    others' once the batch is done, just before each is yielded (so a reader sees them one
    after the other). The KV cache is used; with the same seed the samples are the same.
    Each sample's `seconds` is the batch's time. With `settings.speculative` the MTP modules
    draft, one sample at a time, and each sample reports acceptance and speed-up over plain
    decoding.
    """
    import torch

    from .decode import stream_tokens

    settings.check()
    n = 1 if settings.speculative else settings.num_samples
    _check_memory(loaded, len(prompt.ids), n)
    if settings.seed is None:
        settings.seed = secrets.randbits(63)
    tokenizer, model, device = loaded.tokenizer, loaded.model, loaded.device
    eot_id = tokenizer.eot_id if settings.stop_at_eot else None
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    if settings.speculative:
        yield from _speculative_samples(loaded, prompt, settings, eot_id, generator, on_text)
        return
    idx = torch.tensor([prompt.ids] * n, dtype=torch.long, device=device)  # (N, T)
    decoders = [IncrementalDecoder(tokenizer.decode) for _ in range(n)]
    ids: list[list[int]] = [[] for _ in range(n)]
    pieces: list[list[str]] = [[] for _ in range(n)]
    stop_reasons = ["max_new_tokens"] * n
    finished = [False] * n
    start = time.perf_counter()
    with loaded.precision.autocast():
        for tokens in stream_tokens(model, idx, settings.max_new_tokens,
                                    temperature=settings.temperature, top_k=settings.top_k,
                                    top_p=settings.top_p, eot_id=eot_id, generator=generator,
                                    vocab_limit=tokenizer.vocab_size):
            for index, token_id in enumerate(tokens.tolist()):
                if finished[index]:
                    continue
                if eot_id is not None and token_id == eot_id:
                    finished[index], stop_reasons[index] = True, "eot"
                    continue
                ids[index].append(token_id)
                piece = decoders[index].push(token_id)
                if piece:
                    pieces[index].append(piece)
                    if index == 0 and on_text is not None:
                        on_text(0, piece)
    seconds = time.perf_counter() - start
    for index in range(n):
        piece = decoders[index].flush()
        if piece:
            pieces[index].append(piece)
            if index == 0 and on_text is not None:
                on_text(0, piece)
        if index and on_text is not None:
            for piece in pieces[index]:
                on_text(index, piece)
        yield Sample(index=index, text="".join(pieces[index]), token_ids=ids[index],
                     stop_reason=stop_reasons[index], seconds=seconds)


def _speculative_samples(loaded: LoadedCheckpoint, prompt: PromptTokens,
                         settings: SampleSettings, eot_id: int | None, generator: Any,
                         on_text: Callable[[int, str], None] | None) -> Iterator[Sample]:
    """One sample after the other through self-speculative decoding (batch 1)."""
    import torch

    from .speculative import SpeculativeStats, stream_speculative

    tokenizer = loaded.tokenizer
    idx = torch.tensor([prompt.ids], dtype=torch.long, device=loaded.device)  # (1, T)
    for index in range(settings.num_samples):
        decoder = IncrementalDecoder(tokenizer.decode)
        ids: list[int] = []
        pieces: list[str] = []
        stop_reason = "max_new_tokens"
        stats = SpeculativeStats()
        stream = stream_speculative(loaded.model, idx, settings.max_new_tokens, stats=stats,
                                    temperature=settings.temperature, top_k=settings.top_k,
                                    top_p=settings.top_p, eot_id=eot_id, generator=generator,
                                    vocab_limit=tokenizer.vocab_size)
        start = time.perf_counter()
        with loaded.precision.autocast():
            for token in stream:
                token_id = int(token[0])
                if eot_id is not None and token_id == eot_id:
                    stop_reason = "eot"
                    continue
                ids.append(token_id)
                piece = decoder.push(token_id)
                if piece:
                    pieces.append(piece)
                    if on_text is not None:
                        on_text(index, piece)
        seconds = time.perf_counter() - start
        report = {**stats.to_dict(), **_plain_baseline(loaded, idx, stats.tokens, seconds,
                                                       settings)}
        piece = decoder.flush()
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(index, piece)
        yield Sample(index=index, text="".join(pieces), token_ids=ids,
                     stop_reason=stop_reason, seconds=seconds, speculative=report)


def _plain_baseline(loaded: LoadedCheckpoint, idx: Any, tokens: int, seconds: float,
                    settings: SampleSettings) -> dict[str, float]:
    """Time plain KV-cache decoding of as many tokens (same settings, no EOT stop, its own
    seeded generator) for the measured speed-up of speculative decoding."""
    import torch

    from .decode import stream_tokens

    generator = torch.Generator(device=loaded.device).manual_seed(settings.seed or 0)
    start = time.perf_counter()
    with loaded.precision.autocast():
        for _ in stream_tokens(loaded.model, idx, tokens, temperature=settings.temperature,
                               top_k=settings.top_k, top_p=settings.top_p, generator=generator,
                               vocab_limit=loaded.tokenizer.vocab_size):
            pass
    plain = time.perf_counter() - start
    return {"plain_seconds": round(plain, 4),
            "speedup": round(plain / seconds, 3) if seconds > 0 else 0.0}


def _check_memory(loaded: LoadedCheckpoint, prompt_tokens: int, batch: int) -> None:
    """The `batch` samples decoded together: the prompt's forward pass and a full KV cache
    for each must fit."""
    from ..model.costs import inference_bytes
    from ..runtime.device import check_fits

    need = inference_bytes(loaded.info.run.model, batch, max(1, prompt_tokens),
                           act_bytes=loaded.precision.dtype.itemsize, all_logits=False,
                           kv_cache=True)
    check_fits(need, loaded.device, "sampling", "use fewer --num_samples, a smaller model or "
               "another --device")


def read_prompt(prompt: str, prompt_file: str | None, stdin: Any = None) -> str:
    """The prompt text: --prompt_file (a path, or "-" for stdin) wins over --prompt. Either
    is read with the prompt bound (core.files.PROMPT_LIMIT); a file must be a regular one."""
    if prompt_file is None:
        if prompt == "-":
            prompt_file = "-"
        else:
            return prompt
    from ..core.files import PROMPT_LIMIT, read_user_file

    text = read_user_file(prompt_file, "prompt file", PROMPT_LIMIT, allow_stdin=True,
                          stdin=stdin)
    where = "the prompt on stdin" if prompt_file == "-" else f"prompt file {prompt_file}"
    if not text:
        raise LlmctlError(f"{where} is empty (no prompt text); to start from end-of-text, "
                          "pass --prompt ''")
    return text
