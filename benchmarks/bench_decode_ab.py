"""Decode speed of this checkout against another llmctl checkout: greedy tokens/s at batch 1
on CPU, per attention kind, each checkout's default `generate` in its own child process,
the two alternating run by run so that load changes hit both alike. Prints JSON with the
ratio of the best runs (this / other), each back-to-back pair's ratio and their median, and
whether the tokens are the same (`--temperature T [--top_k K]`: seeded sampling instead of
greedy).

    git worktree add /tmp/base <commit>          # the code to compare against
    python benchmarks/bench_decode_ab.py /tmp/base [--runs 6 --rounds 3 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _common import add_model_args, add_moe_arg, decode_overrides, emit, environment

HERE = Path(__file__).resolve().parent

# One measurement in a child process: the model and prompt come from the same seed in
# either checkout (the same config keys and init), so the tokens can be compared.
CHILD = """
import json, sys, time, torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
from llmctl.config import load_config
from llmctl.infer.decode import generate
from llmctl.model import LLM
run = load_config(overrides=spec["overrides"], check_batch_split=False)
torch.manual_seed(0)
prompt = torch.randint(0, spec["overrides"]["vocab_size"], (1, spec["prompt_tokens"]))
model = LLM(run.model).eval()
def run():  # seeded: sampled tokens can be compared too
    return generate(model, prompt, spec["new_tokens"], temperature=spec["temperature"],
                    top_k=spec["top_k"], generator=torch.Generator().manual_seed(0))
out = run()  # warm-up
best = float("inf")
for _ in range(spec["rounds"]):
    start = time.process_time()
    out = run()
    best = min(best, time.process_time() - start)
import llmctl
print(json.dumps({"seconds": best, "tokens": out[0].tolist(), "package": llmctl.__file__}))
"""


def measure(checkout: Path, spec: dict) -> dict:
    # `python -c` puts the working folder first on the path: run it in the checkout
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env,
                         cwd=checkout, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout)[-1500:]}
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="the other llmctl checkout (its root)")
    add_model_args(parser, block_size=512)
    parser.add_argument("--prompt_tokens", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=6, help="child processes per checkout")
    parser.add_argument("--rounds", type=int, default=3, help="timed generations per child")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy (the default); > 0: seeded sampling")
    parser.add_argument("--top_k", type=int, default=None, help="sampling: keep the k likeliest")
    parser.add_argument("--attn", nargs="*", default=["mha", "mqa", "gqa", "mla"])
    add_moe_arg(parser)
    args = parser.parse_args()
    if not (args.other / "llmctl" / "__init__.py").is_file():
        parser.error(f"{args.other} is not an llmctl checkout (no llmctl/__init__.py)")
    env = environment(args.threads)
    if args.prompt_tokens + args.new_tokens > args.block_size:
        parser.error("prompt_tokens + new_tokens must fit in block_size (a pure cache run)")

    checkouts = {"this": HERE.parent, "other": args.other.resolve()}
    results = {}
    for attn in args.attn:
        spec = {"overrides": decode_overrides(args, attn), "threads": args.threads,
                "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                "rounds": args.rounds, "temperature": args.temperature, "top_k": args.top_k}
        seconds: dict[str, list[float]] = {name: [] for name in checkouts}
        tokens, errors = {}, {}
        for run in range(args.runs):
            names = list(checkouts) if run % 2 == 0 else list(checkouts)[::-1]
            for name in names:
                got = measure(checkouts[name], spec)
                if "error" in got:
                    errors[name] = got["error"]
                    continue
                if Path(got["package"]).resolve().parents[1] != checkouts[name]:
                    parser.error(f"{name}: imported {got['package']}, not {checkouts[name]}")
                seconds[name].append(got["seconds"])
                tokens[name] = got["tokens"]
        if errors:
            results[attn] = {"error": errors}
            continue
        best = {name: min(times) for name, times in seconds.items()}
        # each run's pair, measured back to back: robust to load that drifts over minutes
        paired = sorted(o / t for t, o in zip(seconds["this"], seconds["other"], strict=True))
        results[attn] = {
            "this_tokens_per_s": round(args.new_tokens / best["this"], 1),
            "other_tokens_per_s": round(args.new_tokens / best["other"], 1),
            "ratio": round(best["other"] / best["this"], 2),
            "paired_ratios": [round(r, 2) for r in paired],
            "median_paired_ratio": round(statistics.median(paired), 2),
            "same_tokens": tokens["this"] == tokens["other"],
        }
    ratios = [r["ratio"] for r in results.values() if "ratio" in r]
    medians = [r["median_paired_ratio"] for r in results.values() if "ratio" in r]
    emit({
        "benchmark": ("greedy" if args.temperature == 0 else "sampled") +
                     " decoding, batch 1, CPU fp32: this checkout vs another",
        "temperature": args.temperature, "top_k": args.top_k,
        "env": env, "other": str(checkouts["other"]),
        "dims": {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head,
                 "block_size": args.block_size, "vocab_size": args.vocab_size,
                 "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                 "ffn": "moe_16x1s4a" if args.moe else "mlp_4x"},
        "results": results,
        "min_ratio": min(ratios) if ratios else None,
        "min_median_paired_ratio": min(medians) if medians else None,
    })


if __name__ == "__main__":
    main()
