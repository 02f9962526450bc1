"""MLA training step on CPU: llmctl's multi-head latent attention against a plain
implementation that attends in the latent space, in the same model. Prints JSON.

    python benchmarks/bench_mla.py [--shapes char gpt2 --rounds 3]

Shapes (issue 15): 6 layers, n_embd 384, 6 heads, q / kv latents 96, rope_head_dim 32,
block 256, batch 8; `char` has a 128-entry vocabulary (Tiny Shakespeare's characters,
padded), `gpt2` GPT-2's 50304. The plain model is the llmctl model with every attention
module's forward replaced by the textbook absorbed form: W_uk folded into the query,
attention over the [c, k_rope] rows as one KV head shared by every query head (SDPA with
enable_gqa), W_uv applied to the attended latents. Both compute the same function (checked:
equal logits) on the same weights; the step is forward + backward + AdamW.
"""

from __future__ import annotations

import argparse

from _common import emit, environment, interleaved, median

SHAPES = {
    "char": dict(vocab_size=128),
    "gpt2": dict(vocab_size=50304),
}
DIMS = dict(n_layer=6, n_embd=384, n_head=6, attn="mla", q_latent_dim=96, kv_latent_dim=96,
            rope_head_dim=32, pos_emb="rope", block_size=256, dropout=0.0)


def plain_latent_forward(self, x, pos, cache=None):
    """Latent-space attention for training (no cache), written the plain way."""
    import torch
    import torch.nn.functional as F

    from llmctl.model.positional import apply_rope

    B, T, _ = x.shape
    H, hd, r, lat = self.n_head, self.head_dim, self.rope_dim, self.kv_latent_dim
    q = self.q_up(self.q_norm(self.q_down(x))).view(B, T, H, hd + r).transpose(1, 2)
    c, k_rope = self.kv_down(x).split([lat, r], dim=-1)
    c = self.kv_norm(c)  # (B, T, lat)
    cos, sin = pos.rope(r)
    q_nope, q_rope = q.split([hd, r], dim=-1)
    w_uk, w_uv = self.kv_up.weight.view(2, H, hd, lat)
    q = torch.cat((torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk),
                   apply_rope(q_rope, cos, sin)), dim=-1)  # (B, H, T, lat + r)
    kv = torch.cat((c, apply_rope(k_rope, cos, sin)), dim=-1)[:, None]  # (B, 1, T, lat + r)
    o = F.scaled_dot_product_attention(q, kv, kv, is_causal=True, scale=self.scale,
                                       enable_gqa=True)[..., :lat]  # (B, H, T, lat)
    y = torch.einsum("bhtc,hdc->bhtd", o, w_uv).transpose(1, 2).reshape(B, T, H * hd)
    return self.resid_drop(self.proj(y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=1, help="training steps per round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    env = environment(args.threads)

    import copy
    import types

    import torch

    from llmctl.config import load_config
    from llmctl.model import LLM

    results = {}
    for shape in args.shapes:
        run = load_config(overrides={**DIMS, **SHAPES[shape]}, check_batch_split=False)
        torch.manual_seed(0)
        ours = LLM(run.model)
        plain = copy.deepcopy(ours)
        for block in plain.blocks:
            block.attn.forward = types.MethodType(plain_latent_forward, block.attn)
        T, V = run.model.block_size, run.model.vocab_size
        data = torch.randint(0, V, (args.batch_size, T + 1))
        x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
        with torch.no_grad():  # the same function: logits agree to float rounding
            same = (ours(x, use_cache=False).logits
                    - plain(x, use_cache=False).logits).abs().max().item()

        def step_fn(model: torch.nn.Module, x: torch.Tensor = x, y: torch.Tensor = y):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step() -> None:
                model(x, targets=y).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step

        times = interleaved({"llmctl": step_fn(ours), "plain_latent": step_fn(plain)},
                            rounds=args.rounds, repeats=args.steps)
        pairs = [a / b for a, b in zip(times["llmctl"]["cpu"], times["plain_latent"]["cpu"],
                                       strict=True)]
        results[shape] = {
            "vocab_size": V,
            "llmctl_cpu_step_ms": round(1e3 * min(times["llmctl"]["cpu"]), 1),
            "plain_latent_cpu_step_ms": round(1e3 * min(times["plain_latent"]["cpu"]), 1),
            "llmctl_vs_plain_step_time": round(median(pairs), 3),
            "max_logit_difference": same,
        }
    emit({"benchmark": "MLA training step (forward + backward + AdamW), CPU fp32: llmctl vs "
                       "plain latent-space attention, same model and weights",
          "env": env, "dims": {**DIMS, "batch_size": args.batch_size},
          "rounds": args.rounds, "ratio_basis": "median of per-round paired CPU-time ratios",
          "results": results,
          "goal_met": all(r["llmctl_vs_plain_step_time"] <= 1.0 for r in results.values())})


if __name__ == "__main__":
    main()
