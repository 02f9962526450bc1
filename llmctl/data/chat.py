"""Chat data: conversations in JSONL -> tokens, a loss mask and conversation offsets.

Accepted row shapes (one JSON object per line; blank lines are skipped):
- `{"messages": [{"role": "user" | "assistant" | "system", "content": "..."}, ...]}`
  (OpenAI / Hugging Face chat format);
- `{"conversations": [{"from": "human" | "gpt" | "system", "value": "..."}, ...]}`
  (ShareGPT; `user` / `assistant` are accepted as `from` too).

The template, in tokens: for every message `<|ROLE|> content <|endofturn|>`, then the
base tokenizer's end-of-text after the conversation. The role tokens are appended after the
base vocabulary (`<|system|>` only when some conversation has a system message). Only the
assistant's content tokens and its `<|endofturn|>` are targets (mask 1); the model learns to
answer and to stop, never to imitate the user.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import LlmctlError
from ..core.files import JSONL_RECORD_LIMIT, bounded_lines
from .tokenizers import ExtendedTokenizer, Tokenizer

USER, ASSISTANT, SYSTEM, END_OF_TURN = "<|user|>", "<|assistant|>", "<|system|>", "<|endofturn|>"
ROLE_TOKENS = {"user": USER, "assistant": ASSISTANT, "system": SYSTEM}
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                   "assistant": "assistant"}
MASK_SUFFIX = ".mask.bin"  # uint8 per token: 1 = the token is a training target
OFFSETS_SUFFIX = ".offsets.bin"  # uint64 conversation boundaries (n + 1 values)
MAX_REPORTED = 20


@dataclass
class Message:
    role: str  # user | assistant | system
    content: str


def chat_tokens(with_system: bool) -> list[str]:
    """The special tokens a chat dataset appends, in id order."""
    return [USER, ASSISTANT, END_OF_TURN] + ([SYSTEM] if with_system else [])


def parse_row(row: Any) -> list[Message]:
    """The messages of one decoded JSON row; ValueError says what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        items, role_key, text_key, roles = row["messages"], "role", "content", None
    elif "conversations" in row:
        items, role_key, text_key, roles = row["conversations"], "from", "value", _SHAREGPT_ROLES
    else:
        raise ValueError("no 'messages' (or ShareGPT 'conversations') list")
    if not isinstance(items, list) or not items:
        raise ValueError("the message list is empty or not a list")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"message {i} is not an object")
        role, content = item.get(role_key), item.get(text_key)
        role = roles.get(role) if roles is not None and isinstance(role, str) else role
        if role not in ROLE_TOKENS:
            raise ValueError(f"message {i} has {role_key} {item.get(role_key)!r} (expected "
                             f"{', '.join(roles or ROLE_TOKENS)})")
        if not isinstance(content, str):
            raise ValueError(f"message {i} has no string {text_key!r}")
        out.append(Message(role, content))
    if not any(m.role == "assistant" for m in out):
        raise ValueError("no assistant message: nothing to learn from")
    return out


def read_conversations(path: Path) -> list[list[Message]]:
    """Every conversation of a JSONL file; all malformed rows reported at once by line."""
    conversations, problems = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(bounded_lines(f, JSONL_RECORD_LIMIT), 1):
                if line is None:
                    problems.append(f"line {lineno}: longer than {JSONL_RECORD_LIMIT:,} "
                                    "characters")
                    continue
                if not line.strip():
                    continue
                try:
                    conversations.append(parse_row(json.loads(line)))
                except json.JSONDecodeError as err:
                    problems.append(f"line {lineno}: not JSON ({err.msg})")
                except ValueError as err:
                    problems.append(f"line {lineno}: {err}")
    except UnicodeDecodeError as err:
        raise LlmctlError(f"{path} is not UTF-8 text: {err}") from None
    except OSError as err:
        raise LlmctlError(f"cannot read {path}: {err.strerror or err}") from None
    if problems:
        shown = "\n  ".join(problems[:MAX_REPORTED])
        more = (f"\n  ... {len(problems) - MAX_REPORTED} more"
                if len(problems) > MAX_REPORTED else "")
        raise LlmctlError(f"{path}: {len(problems)} malformed chat row(s):\n  {shown}{more}\n"
                          'each line must be {"messages": [{"role": "user"|"assistant"|'
                          '"system", "content": "..."}]}')
    if not conversations:
        raise LlmctlError(f"{path} holds no conversations")
    return conversations


def chat_tokenizer(base: Tokenizer, with_system: bool) -> ExtendedTokenizer:
    """`base` with the chat tokens appended (kept when `base` already has them)."""
    wanted = chat_tokens(with_system)
    if isinstance(base, ExtendedTokenizer):
        missing = [t for t in wanted if t not in base.added_ids]
        if not missing:
            return base
        return ExtendedTokenizer(base.base, [*base.added, *missing])
    return ExtendedTokenizer(base, wanted)


def encode_messages(tok: ExtendedTokenizer, messages: list[Message],
                    ) -> tuple[list[int], list[int]]:
    """(token ids, target mask) of messages in the chat template (no end-of-text)."""
    ids: list[int] = []
    mask: list[int] = []
    eot = tok.token_id(END_OF_TURN)
    for m in messages:
        body = tok.encode(m.content)
        target = 1 if m.role == "assistant" else 0
        ids += [tok.token_id(ROLE_TOKENS[m.role]), *body, eot]
        mask += [0] + [target] * (len(body) + 1)
    return ids, mask


def encode_conversation(tok: ExtendedTokenizer, messages: list[Message],
                        ) -> tuple[list[int], list[int]]:
    """A whole training conversation: the template, then end-of-text (not a target)."""
    ids, mask = encode_messages(tok, messages)
    return ids + [tok.eot_id], mask + [0]


def split_conversations(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean 'goes to val' per conversation: a seeded share, at least one each side."""
    rng = np.random.default_rng(seed)
    val = rng.random(n) < val_fraction
    if n >= 2 and not val.any():
        val[rng.integers(n)] = True
    if n >= 2 and val.all():
        val[rng.integers(n)] = False
    return val


def write_split(folder: Path, split: str, encoded: Iterator[tuple[list[int], list[int]]],
                dtype: str) -> dict[str, Any]:
    """{split}.bin, {split}.mask.bin and {split}.offsets.bin; their meta.json entry."""
    from .layout import sha256_file, split_file

    ids_all: list[int] = []
    mask_all: list[int] = []
    offsets = [0]
    for ids, mask in encoded:
        ids_all += ids
        mask_all += mask
        offsets.append(len(ids_all))
    files = {"file": split_file(split), "mask": split + MASK_SUFFIX,
             "offsets": split + OFFSETS_SUFFIX}
    arrays = {"file": np.asarray(ids_all, dtype=np.dtype(dtype).newbyteorder("<")),
              "mask": np.asarray(mask_all, dtype=np.uint8),
              "offsets": np.asarray(offsets, dtype=np.dtype("uint64").newbyteorder("<"))}
    for key, name in files.items():
        with open(folder / name, "wb") as f:
            f.write(arrays[key].tobytes())
            f.flush()
            os.fsync(f.fileno())
    entry: dict[str, Any] = {**files, "tokens": len(ids_all), "conversations": len(offsets) - 1,
                             "targets": int(sum(mask_all))}
    entry["sha256"] = sha256_file(folder / files["file"])
    return entry
