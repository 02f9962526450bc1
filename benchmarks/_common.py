"""Helpers shared by the benchmark scripts: setup, interleaved timing, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def add_model_args(parser: argparse.ArgumentParser, *, n_layer: int = 4, n_embd: int = 256,
                   n_head: int = 8, vocab_size: int = 8192, block_size: int = 256) -> None:
    """The model-size flags every benchmark takes."""
    parser.add_argument("--n_layer", type=int, default=n_layer)
    parser.add_argument("--n_embd", type=int, default=n_embd)
    parser.add_argument("--n_head", type=int, default=n_head)
    parser.add_argument("--vocab_size", type=int, default=vocab_size)
    parser.add_argument("--block_size", type=int, default=block_size)


def moe_overrides(n_embd: int) -> dict[str, Any]:
    """The benchmarks' MoE FFN as config keys: 16 experts, 1 shared, 4 active, each expert
    a quarter of the dense 4x width (so a token activates the dense FFN's width)."""
    return dict(moe=True, n_exp=16, n_shared=1, n_act=4, up_dim=n_embd, coeff=0.01)


def add_moe_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--moe", action="store_true",
                        help="the FFN as the 16-expert / 1-shared / 4-active MoE")


def decode_overrides(args: argparse.Namespace, attn: str) -> dict[str, Any]:
    """The decoding benchmarks' model for one attention kind (rope, 4x MLP or, with --moe,
    the MoE of moe_overrides), as config keys."""
    C, H = args.n_embd, args.n_head
    extra = {"mha": {}, "mqa": {}, "gqa": {"n_kv_heads": max(1, H // 4)},
             "mla": {"q_latent_dim": C // 2, "kv_latent_dim": C // 4,
                     "rope_head_dim": C // H // 2}}
    ffn = moe_overrides(C) if args.moe else {"up_dim": 4 * C}
    return dict(n_layer=args.n_layer, n_embd=C, n_head=H, vocab_size=args.vocab_size,
                block_size=args.block_size, pos_emb="rope", attn=attn, **ffn, **extra[attn])


def environment(threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    return {"torch": torch.__version__, "threads": threads, "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "python": platform.python_version()}


def interleaved(runs: dict[str, Callable[[], None]], rounds: int, repeats: int,
                warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each function, {"wall": [...], "cpu": [...]} per round, measured
    round-robin so that load changes on a shared machine hit every candidate alike.

    "cpu" is this process's CPU time: with one thread it is the compute cost, unaffected by
    time spent waiting for a core that other processes hold."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times = {name: {"wall": [], "cpu": []} for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
            fn = runs[name]
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(repeats):
                fn()
            times[name]["cpu"].append((time.process_time() - cpu) / repeats)
            times[name]["wall"].append((time.perf_counter() - wall) / repeats)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result, indent=2))
