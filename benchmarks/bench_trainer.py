"""Trainer overhead on CPU: `llmctl train`'s step time against a bare forward / backward /
clip / AdamW loop of the same model on the same batches. Prints JSON.

    python benchmarks/bench_trainer.py [--n_layer 4 --n_embd 128 --block_size 128 ...]

Both loops run in this process, interleaved round by round (the machine is shared), and
are timed over the same steps after a warmup: the trainer from its own metrics records
(everything inside its loop: prefetching, LR schedule, loss / grad-norm sync, MoE bias
update, logging to metrics.jsonl and the console), the bare loop with a stopwatch.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import statistics
import string
import tempfile
import time
from pathlib import Path

from _common import emit, environment


def _corpus(path: Path, chars: int, seed: int = 0) -> None:
    """Random words: no download, and every byte value the tokenizer sees is ASCII."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9)))
             for _ in range(2000)]
    text, size = [], 0
    while size < chars:
        word = rng.choice(words)
        text.append(word)
        size += len(word) + 1
    path.write_text(" ".join(text), encoding="utf-8")


def _flags(args: argparse.Namespace, data_dir: Path, out_dir: Path) -> dict:
    return {"dataset": "bench", "data_dir": str(data_dir), "out_dir": str(out_dir),
            "n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head,
            "block_size": args.block_size, "vocab_size": 320, "up_dim": 4 * args.n_embd,
            "batch_size": args.batch_size, "total_batch_size":
            args.batch_size * args.block_size * args.accum, "warmup_steps": 5,
            "max_iters": args.warmup + args.steps, "log_interval": args.warmup,
            "learning_rate": 1e-3, "device": "cpu", "seed": 1,
            **({"moe": True, "n_exp": 8, "n_shared": 1, "n_act": 3, "aux_free": True,
                "alpha": 1e-4, "gamma": 1e-3, "up_dim": args.n_embd} if args.moe else {})}


def bare_loop(run, warmup: int, steps: int) -> float:
    """Seconds per optimizer step of the simplest correct loop doing the same work."""
    import torch

    from llmctl.data.loader import PreparedDataset
    from llmctl.model import LLM
    from llmctl.train.optim import LRSchedule, build_optimizer, set_lr

    cfg = run.train
    torch.manual_seed(cfg.seed)
    model = LLM(run.model)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    schedule = LRSchedule.from_config(cfg)
    sampler = PreparedDataset.open(cfg.data_dir, cfg.dataset).random_batches(
        "train", cfg.batch_size, run.model.block_size, cfg.seed)
    accum = run.grad_accum_steps()
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        set_lr(optimizer, schedule(step))
        for _ in range(accum):
            x, y = sampler.next_batch()
            (model(x, targets=y).loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if run.model.has_moe:  # the balancing update is part of a step, not overhead
            model.update_expert_biases(model.moe_load_counts())
    return (time.perf_counter() - start) / steps


def trainer_loop(run, warmup: int, steps: int) -> float:
    """Seconds per optimizer step of the trainer, from its metrics records."""
    from llmctl.train.trainer import Trainer

    with contextlib.redirect_stdout(io.StringIO()):  # its console lines, not our JSON
        result = Trainer(run).fit()
    records = [json.loads(line) for line in
               (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time"] for r in records if r["kind"] == "train"}
    return (times[warmup + steps] - times[warmup]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--accum", type=int, default=2, help="micro-steps per step")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--moe", action="store_true",
                        help="aux-free MoE FFNs (8 experts, 1 shared, 3 active): the trainer "
                        "then also all-reduces routing counts and updates the biases")
    args = parser.parse_args()
    env = environment(args.threads)

    from llmctl.config import load_config
    from llmctl.data.prepare import PrepareOptions, prepare_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _corpus(root / "corpus.txt", chars=400_000)
        prepare_dataset(PrepareOptions(source=str(root / "corpus.txt"), name="bench",
                                       data_dir=root / "data", tokenizer="byte",
                                       progress=False, num_proc=1))
        bare, trainer = [], []
        for i in range(args.rounds):
            flags = _flags(args, root / "data", root / "runs")
            run = load_config(overrides={**flags, "file_name": f"round{i}"})
            # alternate which goes first, so neither always inherits the other's state
            order = [(bare, bare_loop), (trainer, trainer_loop)]
            for times, loop in order if i % 2 == 0 else order[::-1]:
                times.append(loop(run, args.warmup, args.steps))

    ratios = [t / b for t, b in zip(trainer, bare, strict=True)]
    tokens = run.train.total_batch_size
    emit({
        "benchmark": "trainer_overhead_cpu",
        "config": {k: getattr(args, k) for k in ("n_layer", "n_embd", "n_head", "block_size",
                                                 "batch_size", "accum", "steps", "rounds",
                                                 "moe")},
        "tokens_per_step": tokens,
        "bare_step_ms": [round(1e3 * s, 2) for s in bare],
        "trainer_step_ms": [round(1e3 * s, 2) for s in trainer],
        "bare_tokens_per_s": round(tokens / statistics.median(bare)),
        "trainer_tokens_per_s": round(tokens / statistics.median(trainer)),
        "overhead_pct_per_round": [round(100 * (r - 1), 2) for r in ratios],
        "overhead_pct_median": round(100 * (statistics.median(ratios) - 1), 2),
        # the fastest round of each: the least disturbed by other load on a shared machine
        "overhead_pct_best_of": round(100 * (min(trainer) / min(bare) - 1), 2),
        "target_pct": 5.0,
        "environment": env,
    })


if __name__ == "__main__":
    main()
