"""`prepare`: a source -> DATA_DIR/NAME/{train.bin,val.bin,meta.json}, atomically.

Everything is written into a hidden `.NAME.partial-PID` folder, meta.json last, and the folder
is renamed into place at the end; an interrupted run never leaves a folder that looks
finished (stale partial folders are removed by the next run). A finished dataset with the
same settings is not redone unless `force`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..core.errors import LlmctlError, one_of
from ..core.files import (
    file_kind,
    move,
    read_user_file,
    write_bytes_atomic,
    write_json_atomic,
)
from . import layout
from .bpe import bpe_vocab_problem
from .dataset_folder import DataDirNotWritable, existing_dataset, install, lock
from .embedded import SHAKESPEARE_DESCRIPTION, SHAKESPEARE_SOURCE, shakespeare_bytes
from .hf_tokenizer import is_hf_tokenizer
from .pipeline import SplitWriter, TokenizerPool, batch_pieces, worker_count
from .progress import Progress
from .registry import DATASETS, HUB_DATASETS
from .sources.base import SourcePlan
from .sources.hub import hub_plan
from .sources.text import local_plan
from .sources.url import is_url, probe_url, url_plan
from .tokenizer_base import MAX_TOKENIZER_BYTES
from .tokenizers import TIKTOKEN_FILE_ENV, CharTokenizer, Tokenizer, create_tokenizer

SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                   "tinyshakespeare/input.txt")  # where the embedded copy comes from
# When set, `prepare shakespeare` downloads from this address (a mirror, a variant of the
# corpus) instead of using the copy embedded in llmctl, as `--source URL` would.
SHAKESPEARE_URL_ENV = "LLMCTL_SHAKESPEARE_URL"
DOWNLOADS = ".downloads"  # under DATA_DIR: fetched source files, reused by later runs
FORMATS = ("text", "chat")


@dataclass
class PrepareOptions:
    dataset: str | None = None  # shakespeare | tinystories | wikitext | fineweb
    source: str | None = None  # local file / folder or http(s) URL
    name: str | None = None  # output folder name (default: dataset, or the source's stem)
    data_dir: str | Path = layout.DEFAULT_DATA_DIR
    tokenizer: str | None = None  # tiktoken encoding (default gpt2), char or byte
    tokenizer_file: str | Path | None = None  # local .tiktoken rank file
    text_field: str = "text"
    subset: str | None = None  # hub config (wikitext-2-raw-v1, sample-10BT, ...)
    val_fraction: float | None = None  # default 0.1 (fineweb: 0.001)
    max_tokens: int | None = None
    num_proc: int | None = None  # default min(8, CPUs)
    seed: int = 1337
    force: bool = False
    streaming: bool | None = None  # default: the dataset's own (fineweb streams)
    cache_dir: str | Path | None = None  # Hugging Face datasets cache
    progress: bool = True
    format: str = "text"  # text | chat (JSONL conversations, see data.chat)
    base_tokenizer: dict[str, Any] | None = None  # a recorded spec to use (e.g. a checkpoint's)
    base_tokenizer_folder: str | Path | None = None  # where that spec's files lie
    bpe_vocab: int = 8192  # --tokenizer bpe: vocabulary size of the trained BPE

    @property
    def effective_val_fraction(self) -> float:
        if self.val_fraction is not None:
            return self.val_fraction
        return 0.001 if self.dataset == "fineweb" else 0.1


@dataclass
class PrepareResult:
    folder: Path
    meta: dict[str, Any]
    skipped: bool  # already prepared with the same settings: nothing was done
    seconds: float


def prepare_dataset(opts: PrepareOptions) -> PrepareResult:
    """Prepare (or find already prepared) the dataset `opts` describes."""
    start = time.perf_counter()
    _check_options(opts)
    name = layout.check_name(_output_name(opts))
    data_dir = Path(opts.data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LlmctlError(f"cannot create data_dir {data_dir}: {err.strerror or err}") from None
    fingerprint = _fingerprint(opts, name)
    final = data_dir / name
    try:
        with lock(data_dir, name):
            return _prepare_locked(opts, name, data_dir, fingerprint, start)
    except DataDirNotWritable:
        # nothing can be written here; a finished dataset with these settings needs nothing
        existing = None if opts.force else existing_dataset(final, fingerprint, force=False)
        if existing is None:
            raise
        return PrepareResult(final, existing, True, time.perf_counter() - start)


def _prepare_locked(opts: PrepareOptions, name: str, data_dir: Path,
                    fingerprint: dict[str, Any], start: float) -> PrepareResult:
    final = data_dir / name
    for stale in [*data_dir.glob(f".{name}.partial-*"), *data_dir.glob(f".{name}.old-*")]:
        # left by a killed run; the lock says none is running
        shutil.rmtree(stale, ignore_errors=True)
    existing = existing_dataset(final, fingerprint, opts.force)
    if existing is not None:
        return PrepareResult(final, existing, True, time.perf_counter() - start)
    partial = data_dir / f".{name}.partial-{os.getpid()}"
    try:
        partial.mkdir()
    except OSError as err:
        raise LlmctlError(f"cannot create {partial}: {err.strerror or err}") from None
    try:
        build = _build_chat if opts.format == "chat" else _build
        meta = build(opts, name, data_dir, partial, fingerprint, start)
        install(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return PrepareResult(final, meta, False, time.perf_counter() - start)


def _check_options(opts: PrepareOptions) -> None:
    """Every problem with the options themselves, reported at once."""
    problems = []
    if opts.format not in FORMATS:
        problems.append(f"--format: {one_of(opts.format, FORMATS)}")
    if opts.format == "chat":
        if opts.source is None or is_url(str(opts.source)) or Path(opts.source).is_dir():
            problems.append("--format chat reads a local JSONL file: pass --source FILE")
        if opts.tokenizer == "char" and opts.base_tokenizer is None:
            problems.append("--format chat with a char tokenizer needs the base model's "
                            "characters: pass --tokenizer_from CKPT (or its dataset folder)")
    if opts.base_tokenizer is not None and (opts.tokenizer or opts.tokenizer_file):
        problems.append("--tokenizer_from replaces --tokenizer / --tokenizer_file; give one")
    if opts.dataset is None and opts.source is None:
        problems.append(f"name a dataset ({', '.join(DATASETS)}) or pass --source PATH|URL")
    if opts.dataset is not None and opts.dataset not in DATASETS and opts.source is None:
        problems.append(f"unknown dataset: {one_of(opts.dataset, DATASETS)}; or pass "
                        "--source PATH|URL (and --name) to prepare your own text")
    if opts.tokenizer == "bpe" and opts.tokenizer_file:
        problems.append("--tokenizer_file is for tiktoken rank files, not --tokenizer bpe")
    if opts.tokenizer == "bpe" and (problem := bpe_vocab_problem(opts.bpe_vocab)):
        problems.append(problem)
    if opts.tokenizer == "char" and opts.tokenizer_file:
        problems.append("--tokenizer_file is for tiktoken rank files, not --tokenizer char")
    if is_hf_tokenizer(opts.tokenizer) and opts.tokenizer_file:
        problems.append("--tokenizer_file is for tiktoken rank files, not --tokenizer hf:PATH")
    if opts.source is not None and not is_url(str(opts.source)) and not Path(
            opts.source).expanduser().exists():
        problems.append(f"--source {opts.source} does not exist")  # before any tokenizer
    elif opts.source is not None and not is_url(str(opts.source)):
        mode = os.stat(Path(opts.source).expanduser()).st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):  # /dev/zero never ends
            problems.append(f"--source {opts.source} is {file_kind(mode)}, not a regular "
                            "file or a folder")
    if opts.val_fraction is not None and not 0 < opts.val_fraction < 1:
        problems.append(f"--val_fraction {opts.val_fraction} must be between 0 and 1")
    if opts.max_tokens is not None and opts.max_tokens < 2:
        problems.append(f"--max_tokens {opts.max_tokens} must be at least 2")
    if opts.num_proc is not None and opts.num_proc < 1:
        problems.append(f"--num_proc {opts.num_proc} must be at least 1")
    if opts.subset and opts.dataset not in HUB_DATASETS:
        problems.append(f"--subset is for {', '.join(HUB_DATASETS)}")
    elif opts.subset and opts.subset not in HUB_DATASETS[opts.dataset].subsets:
        subsets = HUB_DATASETS[opts.dataset].subsets
        problems.append(f"--subset for {opts.dataset}: {one_of(opts.subset, subsets)}")
    _raise_all(problems)


def _raise_all(problems: list[str]) -> None:
    """One LlmctlError naming every problem (each keeps its own fix), if there are any."""
    if len(problems) == 1:
        raise LlmctlError(problems[0])
    if problems:
        lines = [f"prepare cannot start ({len(problems)} problems):"]
        for problem in problems:
            first, *rest = problem.splitlines() or [""]
            lines += [f"  - {first}", *(f"    {line}" for line in rest)]
        raise LlmctlError("\n".join(lines))


def _registry_dataset(opts: PrepareOptions) -> str | None:
    return opts.dataset if opts.dataset in DATASETS else None


def _output_name(opts: PrepareOptions) -> str:
    if opts.name:
        return opts.name
    if opts.dataset:  # a registry dataset, or the name given to --source data
        return opts.dataset
    source = str(opts.source).rstrip("/")
    stem = Path(source.split("?")[0]).stem if is_url(source) else Path(source).stem
    return stem or "dataset"


def _fingerprint(opts: PrepareOptions, name: str) -> dict[str, Any]:
    """The settings that decide a dataset's content: equal ones mean "already prepared"."""
    dataset = _registry_dataset(opts)
    source = opts.source
    if source is not None and not is_url(source):
        source = str(Path(source).resolve())
    elif source is None and dataset == "shakespeare":
        source = os.environ.get(SHAKESPEARE_URL_ENV) or SHAKESPEARE_SOURCE
    file = opts.tokenizer_file or (os.environ.get(TIKTOKEN_FILE_ENV)
                                   if opts.tokenizer not in ("char", "byte", "bpe") else None)
    if is_hf_tokenizer(opts.tokenizer):  # the content decides, not where it lies
        folder = Path(opts.tokenizer.removeprefix("hf:")).expanduser()
        file = folder / "tokenizer.json" if folder.is_dir() else folder
    file_sha = None
    if file and (Path(file).exists() or Path(file).is_symlink()):  # else: the tokenizer says
        # bounded, regular files only (a FIFO or /dev/zero must not hang or fill the memory)
        data = read_user_file(file, "tokenizer file", MAX_TOKENIZER_BYTES, text=False)
        file_sha = hashlib.sha256(data).hexdigest()
    extra = {"bpe_vocab": opts.bpe_vocab} if opts.tokenizer == "bpe" else {}
    return {**extra, "dataset": dataset, "source": source,
            "tokenizer": opts.tokenizer or "gpt2",
            "tokenizer_file_sha256": file_sha, "text_field": opts.text_field,
            "subset": opts.subset or (HUB_DATASETS[dataset].subsets[0]
                                      if dataset in HUB_DATASETS else None),
            "val_fraction": opts.effective_val_fraction, "max_tokens": opts.max_tokens,
            "seed": opts.seed, "format": opts.format,
            "base_tokenizer": _spec_digest(opts.base_tokenizer)}


def _spec_digest(spec: dict[str, Any] | None) -> str | None:
    if spec is None:
        return None
    import json

    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------- building


def _plan(opts: PrepareOptions, data_dir: Path, probe: bool = False) -> SourcePlan | None:
    """The source's streams; `probe`: only check that it can be reached (no download)."""
    downloads = data_dir / DOWNLOADS
    dataset, source = _registry_dataset(opts), opts.source
    if dataset in HUB_DATASETS:
        if source is not None and is_url(source):
            raise LlmctlError(f"--source for {dataset} must be a local copy (a folder or file "
                              "of parquet / JSON(L)); download it first")
        return hub_plan(dataset, source=source, subset=opts.subset, text_field=opts.text_field,
                        streaming=True if probe else opts.streaming, cache_dir=opts.cache_dir)
    what = None
    if dataset == "shakespeare" and source is None:
        source, what = os.environ.get(SHAKESPEARE_URL_ENV), "Tiny Shakespeare"
        if not source:
            return None if probe else _embedded_shakespeare(downloads, opts.text_field)
    if is_url(source):
        if probe:
            return probe_url(source, downloads, what=what)
        return url_plan(source, downloads, opts.text_field, refresh=opts.force, what=what)
    return local_plan(Path(source), opts.text_field)


def _embedded_shakespeare(downloads: Path, text_field: str) -> SourcePlan:
    """The Tiny Shakespeare copy inside llmctl, unpacked once under DATA_DIR/.downloads."""
    data = shakespeare_bytes()
    path = downloads / "embedded-tinyshakespeare.txt"
    try:  # read back only a file of the copy's size (it is ours, but under a user's folder)
        current = (path.read_bytes() if path.is_file() and path.stat().st_size == len(data)
                   else None)
        if current != data:
            downloads.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, data)
    except OSError as err:
        raise LlmctlError(f"cannot write {path}: {err.strerror or err}") from None
    return local_plan(path, text_field, description=SHAKESPEARE_DESCRIPTION)


def _fit_chars(plan: SourcePlan, opts: PrepareOptions) -> CharTokenizer:
    """The char vocabulary of everything the tokenization pass can reach (with max_tokens:
    the first max_tokens characters of each stream, a superset of what gets written)."""
    def texts() -> Iterator[str]:
        for stream in plan.streams:
            seen = 0
            for text, _, _ in stream.pieces():
                yield text
                seen += len(text)
                if opts.max_tokens and seen >= opts.max_tokens:
                    break
    return CharTokenizer.fit(texts())


def _build(opts: PrepareOptions, name: str, data_dir: Path, partial: Path,
           fingerprint: dict[str, Any], start: float) -> dict[str, Any]:
    tokenizer: Tokenizer | None = None
    if opts.tokenizer not in ("char", "bpe"):  # a bad tokenizer is found before any download
        try:
            tokenizer = create_tokenizer(opts.tokenizer, opts.tokenizer_file)
        except LlmctlError as err:  # also say whether the source can be reached, then stop
            problems = [str(err)]
            try:
                _plan(opts, data_dir, probe=True)
            except LlmctlError as source_err:
                problems.append(str(source_err))
            _raise_all(problems)
    plan = _plan(opts, data_dir)
    assert plan is not None
    bpe = None
    if opts.tokenizer == "bpe":
        from .bpe_corpus import train_on_split

        bpe = train_on_split(plan, opts)
        tokenizer = bpe.tokenizer
    elif tokenizer is None:
        tokenizer = _fit_chars(plan, opts)
    tokenizer.save_files(partial)
    dtype = layout.dtype_for_vocab(tokenizer.vocab_size)
    num_proc = worker_count(opts.num_proc)
    with TokenizerPool(tokenizer, partial, dtype, num_proc) as pool:
        writers = _tokenize(plan, pool, partial, dtype, opts, name)
    splits = _finish_splits(plan, writers, partial, opts.effective_val_fraction,
                            n_train=bpe.train_tokens if bpe is not None else None)
    if sum(entry["tokens"] for entry in splits.values()) == 0:
        raise LlmctlError(f"source {plan.description} has no text")
    for split, entry in splits.items():
        if entry["tokens"] == 0:
            raise LlmctlError(f"the {split} split of {plan.description} came out empty; use "
                              "more data or a larger --val_fraction")
    checksums = {entry["file"]: entry["sha256"] for entry in splits.values()}
    if tokenizer.spec.get("sha256"):
        checksums[tokenizer.spec["file"]] = tokenizer.spec["sha256"]
    meta = {
        "format": layout.FORMAT_VERSION,
        "dataset": _registry_dataset(opts) or name,
        "name": name,
        "source": plan.description,
        "tokenizer": tokenizer.spec,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": dtype,
        "byte_order": "little",
        "max_token_id": max(max(w.max_id for w in writers.values()), 0),
        "splits": splits,
        "split_policy": plan.split_policy,
        "checksums": {"algorithm": "sha256", **checksums},
        "options": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - start, 3),
        "llmctl_version": __version__,
    }
    if bpe is not None:
        meta["compression"] = bpe.compression
    write_json_atomic(partial / layout.META_FILE, meta)  # last: the dataset is whole
    return meta


def _tokenize(plan: SourcePlan, pool: TokenizerPool, partial: Path, dtype: str,
              opts: PrepareOptions, name: str) -> dict[str, SplitWriter]:
    """Run every stream through the pool into per-split writers, honouring max_tokens."""
    writers: dict[str, SplitWriter] = {}
    fraction = opts.effective_val_fraction
    rng = np.random.default_rng(opts.seed)
    try:
        for stream in plan.streams:
            if plan.split_policy == "heldout":
                def route() -> str:
                    return "val" if rng.random() < fraction else "train"
            else:
                def route(split: str = stream.split) -> str:
                    return split
            cap = _cap(plan, stream.split, writers, opts.max_tokens, fraction)
            if cap is not None and cap <= 0:
                continue
            label = f"{name} [{stream.label}]"
            with Progress(label, stream.total, stream.unit, cap, opts.progress) as bar:
                written = 0
                for item, tokens in pool.map(batch_pieces(stream.pieces(), route)):
                    if cap is not None:
                        tokens = tokens[:cap - written]
                    if item.split not in writers:
                        writers[item.split] = SplitWriter(
                            partial / layout.split_file(item.split), dtype)
                    writers[item.split].write(tokens)
                    written += len(tokens)
                    bar.advance(item.units, len(tokens))
                    if cap is not None and written >= cap:
                        break
    finally:
        for writer in writers.values():
            writer.close()
    return writers


def _cap(plan: SourcePlan, split: str, writers: dict[str, SplitWriter],
         max_tokens: int | None, fraction: float) -> int | None:
    """Tokens this stream may still add: own splits give val its fraction of max_tokens."""
    if max_tokens is None:
        return None
    if plan.split_policy == "own" and split == "val":
        return max(1, int(max_tokens * fraction))
    return max_tokens - sum(w.tokens for w in writers.values())


def _finish_splits(plan: SourcePlan, writers: dict[str, SplitWriter], partial: Path,
                   fraction: float, n_train: int | None = None) -> dict[str, dict[str, Any]]:
    """{split: {file, tokens, sha256}}; the tail policy cuts all.bin into train and val
    (after `n_train` tokens when given: where a trained tokenizer's training text ends)."""
    for split in layout.SPLITS:
        if split not in writers and plan.split_policy != "tail":  # an empty split
            writers[split] = SplitWriter(partial / layout.split_file(split), "uint16")
            writers[split].close()
    if plan.split_policy != "tail":
        return {split: {"file": layout.split_file(split), "tokens": writers[split].tokens,
                        "sha256": writers[split].sha256} for split in layout.SPLITS}
    whole = writers.get("all")
    total = whole.tokens if whole else 0
    if n_train is None:
        n_train = min(max(int(total * (1 - fraction)), 1), max(total - 1, 0)) if total else 0
    n_train = min(n_train, total)
    itemsize = whole.dtype.itemsize if whole else 2
    all_path = partial / layout.split_file("all")
    train_path, val_path = (partial / layout.split_file(s) for s in layout.SPLITS)
    if not all_path.exists():
        all_path.touch()
    with open(all_path, "rb") as src, open(val_path, "wb") as dst:
        src.seek(n_train * itemsize)
        while block := src.read(1 << 22):
            dst.write(block)
        dst.flush()
        os.fsync(dst.fileno())
    os.truncate(all_path, n_train * itemsize)
    move(all_path, train_path)
    return {"train": {"file": train_path.name, "tokens": n_train,
                      "sha256": layout.sha256_file(train_path)},
            "val": {"file": val_path.name, "tokens": total - n_train,
                    "sha256": layout.sha256_file(val_path)}}


def _base_tokenizer(opts: PrepareOptions) -> Tokenizer:
    if opts.base_tokenizer is not None:
        from .tokenizers import tokenizer_from_spec

        return tokenizer_from_spec(opts.base_tokenizer, opts.base_tokenizer_folder)
    return create_tokenizer(opts.tokenizer, opts.tokenizer_file)


def _build_chat(opts: PrepareOptions, name: str, data_dir: Path, partial: Path,
                fingerprint: dict[str, Any], start: float) -> dict[str, Any]:
    """A chat dataset: conversations split train / val whole, tokens + mask + offsets."""
    from . import chat

    base = _base_tokenizer(opts)
    source = Path(opts.source).expanduser()
    conversations = chat.read_conversations(source)
    with_system = any(m.role == "system" for c in conversations for m in c)
    tokenizer = chat.chat_tokenizer(base, with_system)
    tokenizer.save_files(partial)
    dtype = layout.dtype_for_vocab(tokenizer.vocab_size)
    to_val = chat.split_conversations(len(conversations), opts.effective_val_fraction,
                                      opts.seed)
    try:
        encoded = [chat.encode_conversation(tokenizer, c) for c in conversations]
    except LlmctlError as err:
        raise LlmctlError(f"{source}: {err}") from None
    splits = {}
    for split, wanted in (("train", False), ("val", True)):
        rows = (e for e, v in zip(encoded, to_val, strict=True) if bool(v) == wanted)
        splits[split] = chat.write_split(partial, split, rows, dtype)
    if splits["train"]["targets"] == 0:
        raise LlmctlError(f"{source}: the train split has no assistant tokens to learn")
    checksums = {entry["file"]: entry["sha256"] for entry in splits.values()}
    meta = {
        "format": layout.FORMAT_VERSION,
        "dataset": name,
        "name": name,
        "source": str(source),
        "data_format": "chat",
        "tokenizer": tokenizer.spec,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "special_tokens": dict(tokenizer.added_ids),
        "chat_template": "per message: <|ROLE|> content <|endofturn|>; end-of-text after the "
                         "conversation; targets: assistant content and its <|endofturn|>",
        "dtype": dtype,
        "byte_order": "little",
        "max_token_id": int(max(max(e[0]) for e in encoded)),
        "splits": splits,
        "split_policy": "heldout conversations",
        "checksums": {"algorithm": "sha256", **checksums},
        "options": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - start, 3),
        "llmctl_version": __version__,
    }
    write_json_atomic(partial / layout.META_FILE, meta)  # last: the dataset is whole
    return meta
