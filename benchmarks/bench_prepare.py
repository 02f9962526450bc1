"""Tokens/s of `llmctl prepare` (GPT-2, from a local rank file) on a ~50 MB text corpus,
against tiktoken's own `encode_ordinary_batch` with as many threads as prepare has worker
processes, measured in alternating rounds of the same run. Prints JSON.

prepare's time is the whole pipeline (start the workers, read, tokenize, write the token
files with checksums, meta.json); tiktoken's is the bare encode of the text already in
memory. Target: ratio >= 0.8.

    python benchmarks/bench_prepare.py --rank_file PATH/gpt2.tiktoken --text PATH/input.txt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from llmctl.data.prepare import PrepareOptions, prepare_dataset  # noqa: E402
from llmctl.data.sources.text import text_file_pieces  # noqa: E402
from llmctl.data.tokenizers import create_tokenizer  # noqa: E402

# The offline corpus / rank file folder the tests use, when set (as .ci/run does).
SHARED = Path(os.environ["LLMCTL_SHARED_DATA"]) if os.environ.get("LLMCTL_SHARED_DATA") else None


def make_corpus(text_path: Path, folder: Path, megabytes: float) -> Path:
    """The text repeated to ~`megabytes`, as one UTF-8 file."""
    text = text_path.read_bytes()
    copies = max(1, round(megabytes * 1e6 / len(text)))
    corpus = folder / "corpus.txt"
    with open(corpus, "wb") as f:
        for _ in range(copies):
            f.write(text)
    return corpus


def time_prepare(corpus: Path, rank_file: Path, data_dir: Path, workers: int) -> tuple[float, int]:
    shutil.rmtree(data_dir, ignore_errors=True)
    start = time.perf_counter()
    result = prepare_dataset(PrepareOptions(source=str(corpus), name="bench", data_dir=data_dir,
                                            tokenizer_file=rank_file, num_proc=workers,
                                            progress=False))
    seconds = time.perf_counter() - start
    return seconds, sum(entry["tokens"] for entry in result.meta["splits"].values())


def time_tiktoken(encoding, chunks: list[str], threads: int) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = encoding.encode_ordinary_batch(chunks, num_threads=threads)
    seconds = time.perf_counter() - start
    return seconds, sum(map(len, tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank_file", type=Path, required=SHARED is None,
                        default=SHARED / "gpt2.tiktoken" if SHARED else None,
                        help="GPT-2's .tiktoken rank file (default: $LLMCTL_SHARED_DATA/...)")
    parser.add_argument("--text", type=Path, required=SHARED is None,
                        default=SHARED / "tinyshakespeare.txt" if SHARED else None,
                        help="text repeated into the corpus (default: Tiny Shakespeare in "
                        "$LLMCTL_SHARED_DATA)")
    parser.add_argument("--megabytes", type=float, default=50.0)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="prepare's --num_proc, and tiktoken's num_threads")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for path in (args.rank_file, args.text):
        if not path.is_file():
            sys.exit(f"{path} not found (pass --rank_file / --text)")

    encoding = create_tokenizer(None, args.rank_file).encoding  # tiktoken's own Encoding
    with tempfile.TemporaryDirectory(prefix="bench_prepare-") as tmp:
        corpus = make_corpus(args.text, Path(tmp), args.megabytes)
        # tiktoken gets the same text, cut where prepare cuts it (cuts never change tokens).
        chunks = [piece for piece, _, _ in text_file_pieces(corpus)]
        rounds = []
        time_tiktoken(encoding, chunks[:2], args.workers)  # warm-up
        for i in range(args.rounds):
            order = ("prepare", "tiktoken") if i % 2 == 0 else ("tiktoken", "prepare")
            measured = {}
            for name in order:
                if name == "prepare":
                    measured[name] = time_prepare(corpus, args.rank_file, Path(tmp) / "data",
                                                  args.workers)
                else:
                    measured[name] = time_tiktoken(encoding, chunks, args.workers)
            (p_s, p_tokens), (t_s, t_tokens) = measured["prepare"], measured["tiktoken"]
            if p_tokens != t_tokens + 1:  # prepare adds one end-of-text to the document
                sys.exit(f"token counts differ: prepare {p_tokens}, tiktoken {t_tokens} + 1")
            rounds.append({"prepare_s": round(p_s, 3), "tiktoken_s": round(t_s, 3),
                           "prepare_tokens_per_s": round(p_tokens / p_s),
                           "tiktoken_tokens_per_s": round(t_tokens / t_s),
                           "ratio": round((p_tokens / p_s) / (t_tokens / t_s), 3)})
        size = corpus.stat().st_size
    ratio = statistics.median(r["ratio"] for r in rounds)
    print(json.dumps({
        "benchmark": "prepare_vs_tiktoken_encode_ordinary_batch",
        "corpus_bytes": size, "tokens": t_tokens + 1, "workers_and_threads": args.workers,
        "prepare_tokens_per_s": statistics.median(r["prepare_tokens_per_s"] for r in rounds),
        "tiktoken_tokens_per_s": statistics.median(r["tiktoken_tokens_per_s"] for r in rounds),
        "ratio": ratio, "target": 0.8, "meets_target": ratio >= 0.8, "rounds": rounds,
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg")
                    else None},
    }, indent=2))


if __name__ == "__main__":
    main()
