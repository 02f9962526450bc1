"""Time to a target loss on CPU: the nanoGPT recipe (baseline) against examples/cpu_fast.yaml
on Tiny Shakespeare (char). Prints JSON.

    python benchmarks/bench_recipe.py                      # baseline 2000 steps (nanoGPT's)
    python benchmarks/bench_recipe.py --baseline_steps 600 # shorter, for a shared machine
    python benchmarks/bench_recipe.py --variant '{"qk_norm": false}'   # more candidates

Baseline: 4 layers x 128, 4 heads, block 64, batch 12, learned positions, LayerNorm, GELU,
tied head, AdamW lr 1e-3 -> 1e-4, warmup 100, beta2 0.99 (nanoGPT's shakespeare_char, CPU
size). Every run trains in this process, round-robin in chunks of `--chunk` steps so that
load changes on a shared machine hit all alike; the clock counts training only. Every
`--eval_every` steps each run is evaluated on the whole val split (non-overlapping windows).
Reported: the baseline's final val loss (the target), and per run the training seconds at
which it first reached it; the goal is fast <= 0.6 x baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import emit, environment

HERE = Path(__file__).resolve().parent
BASELINE = dict(n_layer=4, n_embd=128, n_head=4, attn="mha", pos_emb="learn", norm="layer",
                non_linearity="gelu", up_dim=512, block_size=64, dropout=0.0,
                batch_size=12, total_batch_size=12 * 64, learning_rate=1e-3, min_lr=1e-4,
                warmup_steps=100, beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0)


def prepare(text: Path, data_dir: Path) -> None:
    from llmctl.data.prepare import PrepareOptions, prepare_dataset

    prepare_dataset(PrepareOptions(source=str(text), name="shakespeare_char", data_dir=data_dir,
                                   tokenizer="char", progress=False, num_proc=1))


def load_yaml_overrides(path: Path) -> dict[str, Any]:
    """Flat overrides from a config file's model and train sections."""
    import yaml

    raw = yaml.safe_load(path.read_text())
    return {**raw.get("model", {}), **raw.get("train", {})}


class Run:
    """One recipe: model, optimizer, schedule and its own data order."""

    def __init__(self, name: str, flags: dict[str, Any], data_dir: Path, steps: int):
        import torch

        from llmctl.config import load_config
        from llmctl.data.loader import PreparedDataset
        from llmctl.model import LLM
        from llmctl.train.optim import LRSchedule, build_optimizer

        keep = {"dataset", "data_dir", "eval", "save_model", "file_name", "compile",
                "eval_interval", "eval_iters", "ckpt_interval", "log_interval"}
        flags = {k: v for k, v in flags.items() if k not in keep}
        dataset = PreparedDataset.open(data_dir, "shakespeare_char")
        flags.update(max_iters=steps, vocab_size=max(flags.get("vocab_size", 0), 128))
        self.name, self.steps, self.step = name, steps, 0
        self.run = load_config(overrides=flags)
        self.cfg = self.run.train
        torch.manual_seed(self.cfg.seed)
        self.model = LLM(self.run.model)
        self.optimizer = build_optimizer(self.model, self.cfg, torch.device("cpu"))
        self.schedule = LRSchedule.from_config(self.cfg)
        self.accum = self.run.grad_accum_steps()
        block = self.run.model.block_size
        self.sampler = dataset.random_batches("train", self.cfg.batch_size, block,
                                              seed=self.cfg.seed)
        val = torch.from_numpy(dataset.tokens("val").astype("int64"))
        n = (len(val) - 1) // block
        self.val_x = val[:n * block].view(n, block)
        self.val_y = val[1:n * block + 1].view(n, block)
        self.seconds = 0.0
        self.curve: list[tuple[int, float, float]] = []  # (step, train seconds, val loss)

    def train(self, steps: int) -> None:
        import torch

        from llmctl.train.optim import set_lr

        start = time.perf_counter()
        for _ in range(min(steps, self.steps - self.step)):
            set_lr(self.optimizer, self.schedule(self.step))
            for _ in range(self.accum):
                x, y = self.sampler.next_batch()
                (self.model(x, targets=y).loss / self.accum).backward()
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
        self.seconds += time.perf_counter() - start

    def evaluate(self) -> float:
        """Mean cross-entropy over every val token (the whole split)."""
        import torch

        self.model.eval()
        total, count = 0.0, 0
        with torch.inference_mode():
            for i in range(0, len(self.val_x), 256):
                x, y = self.val_x[i:i + 256], self.val_y[i:i + 256]
                total += self.model(x, targets=y).lm_loss.item() * y.numel()
                count += y.numel()
        self.model.train()
        loss = total / count
        self.curve.append((self.step, round(self.seconds, 2), round(loss, 4)))
        print(f"{self.name} step {self.step}: val {loss:.4f} at {self.seconds:.1f} s",
              file=sys.stderr, flush=True)  # progress; stdout stays one JSON object
        return loss


def time_to(curve: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    for step, seconds, loss in curve:
        if loss <= target:
            return step, seconds
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline_steps", type=int, default=2000)
    parser.add_argument("--fast_steps", type=int, default=None,
                        help="default: the fast config's max_iters scaled like the baseline's")
    parser.add_argument("--fast_config", default=str(HERE.parent / "examples" / "cpu_fast.yaml"))
    parser.add_argument("--variant", action="append", default=[],
                        help="JSON overrides on top of the fast config: another candidate")
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--text", default=None, help="tinyshakespeare.txt (default: "
                        "$LLMCTL_SHARED_DATA/tinyshakespeare.txt or data/shakespeare)")
    args = parser.parse_args()
    env = environment(args.threads)

    shared = Path(os.environ.get("LLMCTL_SHARED_DATA", HERE.parents[1] / "shared" / "data"))
    text = Path(args.text) if args.text else shared / "tinyshakespeare.txt"
    if not text.is_file():
        emit({"benchmark": "recipe", "error": f"no Tiny Shakespeare text at {text}"})
        return
    fast_flags = load_yaml_overrides(Path(args.fast_config))
    scale = args.baseline_steps / 2000
    fast_steps = args.fast_steps or max(1, round(fast_flags.get("max_iters", 2000) * scale))
    with tempfile.TemporaryDirectory() as tmp:
        prepare(text, Path(tmp))
        runs = [Run("baseline", dict(BASELINE), Path(tmp), args.baseline_steps),
                Run("fast", fast_flags, Path(tmp), fast_steps)]
        for i, variant in enumerate(args.variant):
            runs.append(Run(f"variant{i}", {**fast_flags, **json.loads(variant)}, Path(tmp),
                            fast_steps))
        while any(r.step < r.steps for r in runs):
            for run in runs:  # round-robin chunks: shared-machine load hits every run alike
                if run.step < run.steps:
                    before = run.step
                    run.train(args.chunk)
                    if run.step // args.eval_every > before // args.eval_every or \
                            run.step == run.steps:
                        run.evaluate()
    target = runs[0].curve[-1][2]
    base_seconds = runs[0].seconds
    results = {}
    for run in runs:
        reached = time_to(run.curve, target)
        results[run.name] = {
            "steps": run.steps, "train_seconds": round(run.seconds, 1),
            "final_val_loss": run.curve[-1][2],
            "reached_target_at_step": reached[0] if reached else None,
            "seconds_to_target": reached[1] if reached else None,
            "time_ratio_vs_baseline": round(reached[1] / base_seconds, 3) if reached else None,
            "params": run.model.num_params(), "curve": run.curve}
    fast = results["fast"]["time_ratio_vs_baseline"]
    emit({"benchmark": "time to the baseline's final val loss (whole val split), CPU",
          "env": env, "baseline_steps": args.baseline_steps, "target_val_loss": target,
          "fast_config": args.fast_config, "results": results,
          "fast_time_ratio": fast, "goal_met": fast is not None and fast <= 0.6})


if __name__ == "__main__":
    main()
