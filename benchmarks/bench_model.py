"""Training-step throughput on CPU: llmctl's model for four architectures, against a
straightforward nanoGPT-style implementation of the dense dims, and MoE against a dense
model of equal active parameters (both MoE dispatch methods). Every model steps with the
optimizer `llmctl train` builds (AdamW, decay on matrices only, torch's fused kernel where
the device has one: the CPU does) and host memory kept for reuse as the trainer keeps it
(llmctl/runtime/host_memory.py). Prints JSON.

    python benchmarks/bench_model.py [--n_layer 4 --n_embd 256 --block_size 256 ...]
"""

from __future__ import annotations

import argparse
import math

from _common import add_model_args, emit, environment, interleaved, median, moe_overrides


def nanogpt_reference(n_layer: int, n_embd: int, n_head: int, vocab_size: int,
                      block_size: int, up_dim: int):
    """The plain GPT of nanoGPT (bias-free, like llmctl's): what 'at least as fast' is
    measured against."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
            self.c_proj = nn.Linear(n_embd, n_embd, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, T, C = x.shape
            q, k, v = self.c_attn(x).split(n_embd, dim=2)
            q = q.view(B, T, n_head, C // n_head).transpose(1, 2)
            k = k.view(B, T, n_head, C // n_head).transpose(1, 2)
            v = v.view(B, T, n_head, C // n_head).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1 = nn.LayerNorm(n_embd)
            self.attn = Attention()
            self.ln_2 = nn.LayerNorm(n_embd)
            self.c_fc = nn.Linear(n_embd, up_dim, bias=False)
            self.c_proj = nn.Linear(up_dim, n_embd, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.ln_1(x))
            return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(vocab_size, n_embd)
            self.wpe = nn.Embedding(block_size, n_embd)
            self.h = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(n_embd)
            self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
            self.wte.weight = self.lm_head.weight
            for name, p in self.named_parameters():  # nanoGPT's GPT-2 init
                if p.dim() >= 2:
                    std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") \
                        else 0.02
                    nn.init.normal_(p, 0.0, std)

        def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(idx.size(1), device=idx.device)
            x = self.wte(idx) + self.wpe(pos)
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=-1)

    return GPT()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="training steps per round")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steadiest on a shared machine)")
    parser.add_argument("--only", nargs="*", help="subset of model names to run")
    args = parser.parse_args()
    env = environment(args.threads)

    import torch

    from llmctl.config import load_config
    from llmctl.model import LLM
    from llmctl.model.costs import training_flops_per_token
    from llmctl.runtime.host_memory import keep_freed_memory

    env["keeps_freed_host_memory"] = keep_freed_memory()  # as `llmctl train` does on a CPU

    C, H = args.n_embd, args.n_head
    dense_up = 4 * C
    moe = moe_overrides(C)
    n_exp, n_shared, n_act, expert_up = (moe[k] for k in ("n_exp", "n_shared", "n_act",
                                                          "up_dim"))
    base = dict(n_layer=args.n_layer, n_embd=C, n_head=H, vocab_size=args.vocab_size,
                block_size=args.block_size, dropout=0.0)
    configs = {
        "a_dense_gpt2": dict(attn="mha", pos_emb="learn", norm="layer", up_dim=dense_up,
                             non_linearity="gelu"),
        "b_gqa_rope_rms_swiglu": dict(attn="gqa", n_kv_heads=max(1, H // 4), pos_emb="rope",
                                      norm="rms", up_dim=dense_up, non_linearity="swiglu"),
        "c_mla_rope": dict(attn="mla", q_latent_dim=C // 2, kv_latent_dim=C // 4,
                           rope_head_dim=C // H // 2, pos_emb="rope", up_dim=dense_up),
        "d_moe_16x1s4a_loop": dict(attn="mha", **moe),
        "d_moe_16x1s4a_grouped_mm": dict(attn="mha", **moe),
        # dense twin of the MoE: what one token activates (shared + 3 routed experts)
        "dense_equal_active": dict(attn="mha", up_dim=n_act * expert_up),
    }
    torch.manual_seed(0)
    models: dict[str, torch.nn.Module] = {}
    flops: dict[str, float] = {}  # training FLOPs per token, as inspect-params counts them
    for name, extra in configs.items():
        run = load_config(overrides={**base, **extra}, check_batch_split=False)
        flops[name] = training_flops_per_token(run.model)
        dispatch = "grouped_mm" if name.endswith("grouped_mm") else "loop"
        models[name] = LLM(run.model, moe_dispatch=dispatch)
    flops["nanogpt_reference"] = flops["a_dense_gpt2"]  # the same architecture
    models["nanogpt_reference"] = nanogpt_reference(args.n_layer, C, H, args.vocab_size,
                                                    args.block_size, dense_up)
    if args.only:
        models = {k: v for k, v in models.items() if k in args.only}

    B, T = args.batch_size, args.block_size
    data = torch.randint(0, args.vocab_size, (B, T + 1))
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    from llmctl.train.optim import build_optimizer

    train_cfg = run.train  # the default training config: the same for every model

    def step_fn(model: torch.nn.Module):
        # the trainer's optimizer (the default AdamW) for every model, the reference too
        opt = build_optimizer(model, train_cfg, torch.device("cpu"))
        model.train()

        def step() -> None:
            out = model(x, targets=y) if hasattr(model, "moe_layers") else model(x, y)
            loss = out.loss if hasattr(out, "loss") else out
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if hasattr(model, "update_expert_biases"):
                model.update_expert_biases(model.moe_load_counts())
        return step

    times = interleaved({n: step_fn(m) for n, m in models.items()}, rounds=args.rounds,
                        repeats=args.steps)
    tokens = B * T
    results = {}
    for name, model in models.items():
        # best round: CPU-bound work is only ever slowed down by other load on the machine
        wall, cpu = min(times[name]["wall"]), min(times[name]["cpu"])
        results[name] = {"tokens_per_s": round(tokens / wall, 1),
                         "step_ms": round(1e3 * wall, 2),
                         "median_step_ms": round(1e3 * median(times[name]["wall"]), 2),
                         "cpu_step_ms": round(1e3 * cpu, 2),
                         "flops_per_token": flops[name],
                         "params": sum(p.numel() for p in model.parameters())}
        if hasattr(model, "moe_layers") and model.moe_layers:
            results[name]["active_params"] = results[name]["params"] - sum(
                (m.n_routed - m.top_k) * (m.experts.w_up[0].numel() + m.experts.w_down[0].numel())
                for m in model.moe_layers)

    def ratio(a: str, b: str) -> float | None:
        """Step-time ratio a / b: the median over rounds of the paired per-round CPU-time
        ratios (a and b run back to back in every round, so drifts in machine speed cancel;
        CPU time is not inflated by waiting for a core other processes hold)."""
        if a in results and b in results:
            pairs = [ta / tb for ta, tb in zip(times[a]["cpu"], times[b]["cpu"], strict=True)]
            return round(median(pairs), 3)
        return None

    moe_names = [n for n in results if n.startswith("d_moe")]
    fastest_moe = (min(moe_names, key=lambda n: results[n]["cpu_step_ms"]) if moe_names
                   else None)
    emit({
        "benchmark": "training step (forward + backward + AdamW), CPU fp32",
        "env": env,
        "dims": {"n_layer": args.n_layer, "n_embd": C, "n_head": H, "block_size": T,
                 "batch_size": B, "vocab_size": args.vocab_size, "dense_up_dim": dense_up,
                 "moe": {"n_exp": n_exp, "n_shared": n_shared, "n_act": n_act,
                         "expert_up_dim": expert_up}},
        "rounds": args.rounds, "steps_per_round": args.steps,
        "results": results,
        "ratios": {
            "dense_step_time_vs_nanogpt": ratio("a_dense_gpt2", "nanogpt_reference"),
            "moe_loop_step_time_vs_dense_equal_active": ratio("d_moe_16x1s4a_loop",
                                                              "dense_equal_active"),
            "moe_grouped_mm_step_time_vs_dense_equal_active": ratio(
                "d_moe_16x1s4a_grouped_mm", "dense_equal_active"),
            "moe_grouped_mm_vs_loop": ratio("d_moe_16x1s4a_grouped_mm", "d_moe_16x1s4a_loop"),
        },
        "fastest_moe_dispatch": fastest_moe,
        "ratio_basis": "median of per-round paired CPU-time ratios",
        "wall_spread": {n: round(max(v["wall"]) / min(v["wall"]), 3) for n, v in times.items()},
    })


if __name__ == "__main__":
    main()
