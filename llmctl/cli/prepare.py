"""llmctl prepare: download / read a corpus and tokenize it into DATA_DIR/NAME."""

from __future__ import annotations

import contextlib
import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ._common import user_errors

if TYPE_CHECKING:
    from ..data.prepare import PrepareResult

_SOURCE = "Source"
_TOKENS = "Tokenization"
_SIZES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def _count(value: str | None, flag: str) -> int | None:
    """'1000000', '1e6', '10M', '10B' -> an integer count."""
    if value is None:
        return None
    from ..core.errors import LlmctlError

    match = re.fullmatch(r"\s*([0-9_]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*", value.lower())
    if not match:
        raise LlmctlError(f"{flag} {value!r} is not a count (e.g. 1000000, 1e6, 50M, 10B)")
    number = float(match.group(1).replace("_", "")) * _SIZES[match.group(2)]
    if not number < 2**63:  # 1e400 parses as inf, which int() cannot take
        raise LlmctlError(f"{flag} {value!r} is too large (at most {2**63 - 1:,})")
    return int(number)


@contextlib.contextmanager
def _sigterm_cleans_up() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the partial output is removed before exiting."""
    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)
    try:
        previous = signal.signal(signal.SIGTERM, _exit)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def prepare(
    dataset: str | None = typer.Argument(
        None, metavar="DATASET", show_default=False,
        help="shakespeare (Tiny Shakespeare from karpathy/char-rnn, embedded in llmctl: no "
        "download; $LLMCTL_SHAKESPEARE_URL or --source URL downloads instead), tinystories, "
        "wikitext or fineweb (Hugging Face datasets); with --source, any output name."),
    source: str | None = typer.Option(
        None, "--source", metavar="PATH|URL", rich_help_panel=_SOURCE, show_default=False,
        help="Local text / JSONL / JSON / parquet file or folder, or an http(s) URL. For a "
        "named dataset: its local copy (e.g. a hub download) instead of the network."),
    name: str | None = typer.Option(
        None, "--name", rich_help_panel=_SOURCE, show_default=False,
        help="Output name: DATA_DIR/NAME (default: the dataset, or the source's file stem)."),
    data_dir: Path = typer.Option(
        Path("data"), "--data_dir", rich_help_panel=_SOURCE,
        help="Folder holding prepared datasets."),
    text_field: str = typer.Option(
        "text", "--text_field", rich_help_panel=_SOURCE,
        help="Field holding the text in JSON / parquet / hub rows."),
    subset: str | None = typer.Option(
        None, "--subset", rich_help_panel=_SOURCE, show_default=False,
        help="Hub config: wikitext-103-raw-v1 (default) or wikitext-2-raw-v1, ...; fineweb: "
        "sample-10BT (default), sample-100BT, ..."),
    streaming: bool | None = typer.Option(
        None, "--streaming/--no_streaming", rich_help_panel=_SOURCE, show_default=False,
        help="Stream hub data instead of downloading it whole (default: fineweb streams)."),
    cache_dir: Path | None = typer.Option(
        None, "--cache_dir", rich_help_panel=_SOURCE, show_default=False,
        help="Hugging Face datasets cache folder (default: theirs)."),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", rich_help_panel=_TOKENS, show_default=False,
        help="gpt2 (default; built in, no download), another tiktoken encoding (cl100k_base, "
        "...; tiktoken downloads it), char, byte, bpe (a byte-level BPE trained on the "
        "training split, see --bpe_vocab), or hf:PATH (the tokenizer.json of a transformers "
        "folder, or that file: a model to fine-tune with train --init_from hf:PATH; needs "
        "the hf extra; copied into the dataset)."),
    bpe_vocab: int = typer.Option(
        8192, "--bpe_vocab", min=257, rich_help_panel=_TOKENS,
        help="--tokenizer bpe: vocabulary size (end-of-text included) of the trained BPE."),
    tokenizer_file: Path | None = typer.Option(
        None, "--tokenizer_file", rich_help_panel=_TOKENS,
        show_default=False, metavar="PATH",
        help="Local .tiktoken rank file (e.g. cl100k_base.tiktoken), used instead of "
        "downloading; also $LLMCTL_TIKTOKEN_FILE. Copied into the dataset."),
    data_format: str = typer.Option(
        "text", "--format", rich_help_panel=_SOURCE,
        help="text, or chat: a JSONL file of conversations ({\"messages\": [{\"role\", "
        "\"content\"}]}); adds <|user|>, <|assistant|>, <|endofturn|> (and <|system|>) after "
        "the vocabulary and writes a loss mask so only assistant tokens are targets."),
    tokenizer_from: Path | None = typer.Option(
        None, "--tokenizer_from", rich_help_panel=_TOKENS, show_default=False, metavar="PATH",
        help="Use the tokenizer of this checkpoint / run folder / prepared dataset (e.g. the "
        "base model to fine-tune), instead of --tokenizer."),
    val_fraction: float | None = typer.Option(
        None, "--val_fraction", rich_help_panel=_TOKENS, show_default=False,
        help="Validation share when the source has no validation split: the last fraction "
        "of tokens (text sources; default 0.1), or a seeded fraction of documents (fineweb; "
        "default 0.001)."),
    max_tokens: str | None = typer.Option(
        None, "--max_tokens", rich_help_panel=_TOKENS, show_default=False,
        metavar="COUNT", help="Stop after this many tokens in all (e.g. 50M, 10B)."),
    num_proc: int | None = typer.Option(
        None, "--num_proc", min=1, rich_help_panel=_TOKENS, show_default=False,
        help="Tokenizer worker processes (default: CPUs, at most 8; capped at the CPUs)."),
    seed: int = typer.Option(1337, "--seed", rich_help_panel=_TOKENS,
                             help="Seed of the held-out document split."),
    force: bool = typer.Option(False, "--force", "-f",
                               help="Redo a finished dataset (and re-download the source)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    as_json: bool = typer.Option(False, "--json", help="Print the dataset's meta.json."),
) -> None:
    """Tokenize a dataset into DATA_DIR/NAME/{train.bin,val.bin,meta.json}."""
    from ..data.pipeline import usable_cores
    from ..data.prepare import PrepareOptions, prepare_dataset

    if num_proc is not None and num_proc > usable_cores():
        typer.echo(f"note: --num_proc {num_proc} is more than the {usable_cores()} usable CPU "
                   f"cores; starting {usable_cores()} tokenizer processes", err=True)
    with user_errors(), _sigterm_cleans_up():
        base_spec, base_folder = (_tokenizer_of(tokenizer_from) if tokenizer_from
                                  else (None, None))
        opts = PrepareOptions(
            dataset=dataset, source=source, name=name, data_dir=data_dir,
            tokenizer=tokenizer, tokenizer_file=tokenizer_file, text_field=text_field,
            subset=subset, val_fraction=val_fraction,
            max_tokens=_count(max_tokens, "--max_tokens"), num_proc=num_proc, seed=seed,
            force=force, streaming=streaming, cache_dir=cache_dir, progress=not quiet,
            format=data_format, base_tokenizer=base_spec, base_tokenizer_folder=base_folder,
            bpe_vocab=bpe_vocab)
        result = prepare_dataset(opts)
    if result.skipped:
        typer.echo(f"{result.folder} is already prepared with these settings (pass --force "
                   "to redo it)", err=True)
    if as_json:
        typer.echo(json.dumps(result.meta, indent=2, ensure_ascii=False))
        return
    _print_summary(result)


def _tokenizer_of(path: Path) -> tuple[dict, Path]:
    """(tokenizer spec, folder of its files) recorded by a dataset folder or a checkpoint."""
    from ..core.errors import LlmctlError
    from ..data.layout import META_FILE, read_meta
    from ..runtime.checkpoint import read_checkpoint

    if (path / META_FILE).is_file():
        return read_meta(path)["tokenizer"], path
    info = read_checkpoint(path)
    if not info.tokenizer:
        raise LlmctlError(f"--tokenizer_from {path}: the checkpoint records no tokenizer")
    return info.tokenizer, info.path


def _print_summary(result: PrepareResult) -> None:
    from ..data.tokenizers import describe_spec

    meta = result.meta
    state = "already prepared" if result.skipped else "prepared"
    typer.echo(f"{state} {meta['name']} in {result.folder}")
    typer.echo(f"  source     {meta['source']}")
    typer.echo(f"  tokenizer  {describe_spec(meta['tokenizer'])}: vocab_size "
               f"{meta['vocab_size']}, eot_id {meta['eot_id']}, {meta['dtype']}")
    total = 0
    for split, entry in meta["splits"].items():
        total += entry["tokens"]
        extra = (f" in {entry['conversations']:,} conversations, {entry['targets']:,} "
                 "targets" if "conversations" in entry else "")
        typer.echo(f"  {split:<10} {entry['tokens']:,} tokens{extra}")
    compression = meta.get("compression")
    if compression:
        line = f"  bytes/token {compression['bpe']:.3f} trained bpe"
        if compression.get("gpt2") is not None:
            line += f", {compression['gpt2']:.3f} gpt2"
        typer.echo(line + f" (on {compression['bytes']:,} bytes of {compression['text']} text)")
    if not result.skipped:
        typer.echo(f"  took {result.seconds:.1f}s "
                   f"({total / max(result.seconds, 1e-9):,.0f} tokens/s)")
