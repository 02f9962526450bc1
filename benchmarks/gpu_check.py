"""The GPU path in one command (< 8 minutes on an H100/H200). Prints JSON.

    python benchmarks/gpu_check.py                     # everything
    python benchmarks/gpu_check.py --out gpu.json      # and the report so far, after each part
    python benchmarks/gpu_check.py --skip_tests --train_steps 10
    python benchmarks/gpu_check.py --device cpu --tiny --skip_tests   # a rehearsal on a CPU

1. runs the `gpu`-marked tests (pytest -m gpu);
2. GPT-2 124M training (examples/gpt2_small.yaml shapes): bf16 autocast, torch.compile,
   fused AdamW, the largest micro-batch of 64/32/16/8 that fits; tokens/s and MFU
   (goal: >= 50 % on H100/H200);
3. MoE (16 experts, 1 shared, 4 active, GPT-2-small widths) with the CUDA grouped GEMM
   against the per-expert loop: tokens/s of each;
4. decoding at batch 1 (fast path and the reference path, bf16) for every attention kind:
   tokens/s.

Each part that fails records its error in the report and the others still run (exit 1);
a part that would start after `--budget_s` seconds is skipped and says so. Without CUDA
(and without `--device cpu`) it prints {"cuda": false, ...} and exits 0, so it is safe in
any CI. `--device cpu --tiny` runs every part at toy sizes on a CPU, to check the script.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

GPT2 = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50304, block_size=1024,
            pos_emb="learn", norm="layer", attn="mha", up_dim=3072, non_linearity="gelu")
# the rehearsal's sizes: every part in seconds on a CPU
TINY = dict(GPT2, n_layer=2, n_embd=64, n_head=4, vocab_size=512, block_size=64, up_dim=256)
TRAIN_BATCHES, MOE_BATCHES = [64, 32, 16, 8], [16, 8, 4]


def moe_flags(dense: dict[str, Any]) -> dict[str, Any]:
    """The dense model's MoE twin: 16 experts, 1 shared, 4 active, each a quarter wide."""
    return dict(dense, moe=True, n_exp=16, n_shared=1, n_act=4, up_dim=dense["n_embd"],
                aux_free=True, alpha=0.0001, gamma=0.001)


def decode_flags(dense: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """attention kind -> the decoding model's flags (rope; gqa with a third of the heads)."""
    C, H = dense["n_embd"], dense["n_head"]
    extra = {"mha": {}, "gqa": {"n_kv_heads": max(1, H // 3)}, "mqa": {},
             "mla": {"q_latent_dim": C // 2, "kv_latent_dim": C // 4,
                     "rope_head_dim": max(2, C // H // 2)}}
    return {attn: dict(dense, pos_emb="rope", attn=attn, **flags)
            for attn, flags in extra.items()}


def run_gpu_tests(timeout: int) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p",
                              "no:cacheprovider", str(ROOT / "tests")], capture_output=True,
                             text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout} s"}
    lines = out.stdout.strip().splitlines()
    return {"ok": out.returncode == 0, "returncode": out.returncode,
            "summary": lines[-1] if lines else "",
            "seconds": round(time.perf_counter() - started, 1),
            **({"tail": "\n".join(lines[-30:])} if out.returncode else {})}


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device) -> None:
    """Free what an earlier attempt left (its graphs, its tensors) before the next one."""
    import torch

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def train_speed(flags: dict[str, Any], steps: int, batches: list[int], device,
                moe_dispatch: str = "auto", compile_model: bool = True) -> dict[str, Any]:
    """Tokens/s and MFU of full training steps (forward, backward, fused AdamW) at the
    largest of `batches` that fits."""
    import torch

    from llmctl.config import load_config
    from llmctl.model.costs import training_flops_per_token
    from llmctl.train.flops import mfu, peak_flops

    cfg = load_config(overrides=flags, check_batch_split=False).model
    too_large = []
    for batch in batches:
        _release(device)
        try:
            seconds = _seconds_per_step(cfg, batch, steps, device, moe_dispatch,
                                        compile_model)
        except torch.OutOfMemoryError:
            too_large.append(batch)
            continue
        tokens_per_s = batch * cfg.block_size / seconds
        flops, peak = training_flops_per_token(cfg), peak_flops(device)
        result = {"batch_size": batch, "block_size": cfg.block_size,
                  "compiled": compile_model, "dispatch": moe_dispatch,
                  "step_ms": round(seconds * 1e3, 1), "tokens_per_s": round(tokens_per_s),
                  "flops_per_token": flops, "peak_flops": peak,
                  "mfu": (round(mfu(flops, tokens_per_s, peak), 4) if peak else None),
                  **({"out_of_memory_at": too_large} if too_large else {})}
        if device.type == "cuda":
            result["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
        _release(device)
        return result
    return {"error": f"no batch size of {batches} fits"}


def _seconds_per_step(cfg, batch: int, steps: int, device, moe_dispatch: str,
                      compile_model: bool) -> float:
    import torch

    from llmctl.model import LLM

    torch.manual_seed(0)
    model = LLM(cfg, moe_dispatch=moe_dispatch).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step_model = torch.compile(model) if compile_model else model
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = step_model(x, targets=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # compile + warm-up
        step()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    return (time.perf_counter() - start) / steps


def decode_speed(dense: dict[str, Any], new_tokens: int, device) -> dict[str, Any]:
    """Greedy tokens/s at batch 1 under bf16 autocast, fast and reference path, and whether
    the two chose the same tokens (bf16 rounding may part them after a near tie)."""
    import torch

    from llmctl.config import load_config
    from llmctl.infer.decode import generate
    from llmctl.model import LLM

    results = {}
    for attn, flags in decode_flags(dense).items():
        cfg = load_config(overrides=flags, check_batch_split=False).model
        torch.manual_seed(0)
        model = LLM(cfg).to(device).eval()
        prompt = torch.randint(0, cfg.vocab_size, (1, 16), device=device)
        row, tokens = {}, {}
        for name, fast in (("fast", True), ("reference", False)):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                generate(model, prompt, 16, temperature=0, fast=fast)  # warm-up
                _synchronize(device)
                start = time.perf_counter()
                tokens[name] = generate(model, prompt, new_tokens, temperature=0, fast=fast)
                _synchronize(device)
            row[f"{name}_tokens_per_s"] = round(new_tokens / (time.perf_counter() - start), 1)
        row["fast_vs_reference"] = round(row["fast_tokens_per_s"]
                                         / row["reference_tokens_per_s"], 2)
        row["same_tokens"] = bool(torch.equal(tokens["fast"], tokens["reference"]))
        results[attn] = row
        del model
        _release(device)
    return results


def _write(report: dict[str, Any], out: Path | None) -> None:
    """The report so far, to `out` (atomically: a reader never sees half of it)."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        json.dump(report, f, indent=2)
    os.replace(f.name, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip_tests", action="store_true")
    parser.add_argument("--train_steps", type=int, default=20)
    parser.add_argument("--decode_tokens", type=int, default=256)
    parser.add_argument("--test_timeout", type=int, default=240)
    parser.add_argument("--budget_s", type=float, default=450,
                        help="start no part after this many seconds (the rest: skipped)")
    parser.add_argument("--out", type=Path, help="also write the report here, after each part")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default) or cpu (a rehearsal)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (with --device cpu)")
    parser.add_argument("--no_compile", action="store_true", help="train GPT-2 eagerly")
    args = parser.parse_args(argv)
    for name in ("train_steps", "decode_tokens", "test_timeout", "budget_s"):
        if not getattr(args, name) > 0:  # NaN too
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")

    import torch

    device = torch.device(args.device)
    report: dict[str, Any] = {"benchmark": "gpu_check", "torch": torch.__version__,
                              "cuda": torch.cuda.is_available()}
    if device.type == "cuda" and not torch.cuda.is_available():
        report["message"] = ("no CUDA device: nothing measured; run this on a GPU machine "
                             "(python benchmarks/gpu_check.py)")
        print(json.dumps(report, indent=2))
        return 0
    report["device"] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else f"{device.type} (a rehearsal: no GPU figures)")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dense = TINY if args.tiny else GPT2
    steps = args.train_steps
    parts: list[tuple[str, Callable[[], Any]]] = [] if args.skip_tests else [
        ("gpu_tests", lambda: run_gpu_tests(args.test_timeout))]
    parts += [
        ("gpt2_124m_train", lambda: train_speed(dense, steps, TRAIN_BATCHES, device,
                                                compile_model=not args.no_compile)),
        # the loop's per-expert shapes vary per step: eager, so both run the same way
        *((f"moe_16e_train_{d}", lambda d=d: train_speed(
            moe_flags(dense), max(5, steps // 2), MOE_BATCHES, device, moe_dispatch=d,
            compile_model=False)) for d in ("grouped_mm", "loop")),
        ("decode_batch1_bf16", lambda: decode_speed(dense, args.decode_tokens, device)),
    ]
    started, failed = time.perf_counter(), False
    for name, part in parts:
        elapsed = time.perf_counter() - started
        if elapsed > args.budget_s:
            report[name] = {"skipped": f"the time budget ({args.budget_s:g} s) was spent"}
            continue
        try:
            report[name] = part()
        except Exception as error:  # one part's failure must not lose the others' figures
            tail = traceback.format_exc().strip().splitlines()[-12:]
            report[name] = {"error": f"{type(error).__name__}: {error}"[:2000],
                            "traceback": tail}
        failed |= "error" in report[name] or report[name].get("ok") is False
        _write(report, args.out)
    train = report.get("gpt2_124m_train", {})
    if train.get("mfu") is not None:
        train["mfu_goal_0.5_met"] = train["mfu"] >= 0.5
    moe = [report.get(f"moe_16e_train_{d}", {}) for d in ("grouped_mm", "loop")]
    if all("tokens_per_s" in r for r in moe):
        report["moe_grouped_vs_loop"] = round(moe[0]["tokens_per_s"] / moe[1]["tokens_per_s"],
                                              2)
    report["seconds"] = round(time.perf_counter() - started, 1)
    _write(report, args.out)
    print(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
