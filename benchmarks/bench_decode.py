"""Decode speed on CPU: tokens/s of the fast decoding step (infer/fastpath.py), of the
reference cached path (the model's own forward every step) and of recomputing the whole
context every step, for each attention kind (greedy, batch 1); and of the fast step sampling
(seeded), through the int8 screen of the head (infer/sampled_head.py) and with the screen
off (every logit through the fp32 head), side by side: at temperature 1 (rejection, other
random numbers than the full head's) and at `sample`'s defaults, temperature 0.9 and top-k
200 (the same tokens as the full head). Prints JSON.

    python benchmarks/bench_decode.py [--new_tokens 256 --n_layer 4 --n_embd 256 ...]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from _common import add_model_args, add_moe_arg, decode_overrides, emit, environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser, block_size=512)
    parser.add_argument("--prompt_tokens", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steadiest on a shared machine)")
    parser.add_argument("--attn", nargs="*", default=["mha", "mqa", "gqa", "mla"])
    add_moe_arg(parser)
    parser.add_argument("--no_recompute", action="store_true",
                        help="skip the (slow) full-recompute baseline")
    args = parser.parse_args()
    env = environment(args.threads)

    import torch

    from llmctl.config import load_config
    from llmctl.infer import greedy_head
    from llmctl.infer.decode import generate
    from llmctl.model import LLM

    if args.prompt_tokens + args.new_tokens > args.block_size:
        parser.error("prompt_tokens + new_tokens must fit in block_size (a pure cache run)")
    torch.manual_seed(0)
    prompt = torch.randint(0, args.vocab_size, (1, args.prompt_tokens))

    @torch.no_grad()
    def recompute(model: LLM) -> torch.Tensor:
        idx = prompt
        for _ in range(args.new_tokens):
            logits = model(idx, use_cache=False, last_logits_only=True).logits[:, -1]
            idx = torch.cat((idx, logits.argmax(-1, keepdim=True)), dim=1)
        return idx

    def fast(model: LLM) -> torch.Tensor:
        return generate(model, prompt, args.new_tokens, temperature=0)

    def cached(model: LLM) -> torch.Tensor:
        return generate(model, prompt, args.new_tokens, temperature=0, fast=False)

    def sampling(temperature: float, top_k: int | None,
                 screen: bool) -> Callable[[LLM], torch.Tensor]:
        def run(model: LLM) -> torch.Tensor:
            # a decoder builds its screen on first use, where the head holds MIN_NUMBERS
            kept = greedy_head.MIN_NUMBERS
            greedy_head.MIN_NUMBERS = kept if screen else 1 << 62
            try:
                return generate(model, prompt, args.new_tokens, temperature=temperature,
                                top_k=top_k, generator=torch.Generator().manual_seed(0))
            finally:
                greedy_head.MIN_NUMBERS = kept
        return run

    sampled_runs = {"fast_sampled": sampling(1.0, None, True),
                    "fast_sampled_full_head": sampling(1.0, None, False),
                    "fast_top_k": sampling(0.9, 200, True),
                    "fast_top_k_full_head": sampling(0.9, 200, False)}
    results = {}
    for attn in args.attn:
        run = load_config(overrides=decode_overrides(args, attn), check_batch_split=False)
        model = LLM(run.model).eval()
        runs = {"fast": fast, **sampled_runs, "cache": cached, "recompute": recompute}
        if args.no_recompute:
            del runs["recompute"]
        best = dict.fromkeys(runs, float("inf"))
        outputs = {}
        fast(model)  # warm-up
        cached(model)
        for _ in range(args.rounds):  # interleaved, best of rounds (CPU time: 1 thread)
            for name, fn in runs.items():
                start = time.process_time()
                outputs[name] = fn(model)
                best[name] = min(best[name], time.process_time() - start)
        results[attn] = {f"{name}_tokens_per_s": round(args.new_tokens / best[name], 1)
                         for name in runs}
        results[attn]["fast_vs_cache"] = round(best["cache"] / best["fast"], 2)
        if "recompute" in runs:
            results[attn]["speedup"] = round(best["recompute"] / best["cache"], 2)
        for kind in ("fast_sampled", "fast_top_k"):  # the screen against the full head
            results[attn][f"{kind}_screen_vs_full_head"] = round(
                best[f"{kind}_full_head"] / best[kind], 2)
        results[attn]["same_tokens"] = all(torch.equal(outputs["fast"], outputs[name])
                                           for name in ("cache", "recompute") if name in runs)
        results[attn]["same_top_k_tokens"] = torch.equal(outputs["fast_top_k"],
                                                          outputs["fast_top_k_full_head"])
    emit({
        "benchmark": "greedy decoding, batch 1, CPU fp32: fast step, reference cache, "
                     "full recompute",
        "env": env,
        "dims": {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head,
                 "block_size": args.block_size, "vocab_size": args.vocab_size,
                 "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                 "ffn": "moe_16x1s4a" if args.moe else "mlp_4x"},
        "results": results,
        "min_fast_vs_cache": min(r["fast_vs_cache"] for r in results.values()),
        "min_top_k_screen_vs_full_head": min(r["fast_top_k_screen_vs_full_head"]
                                             for r in results.values()),
    })


if __name__ == "__main__":
    main()
