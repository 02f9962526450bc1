"""Self-speculative decoding with the model's multi-token prediction modules.

Each round, with N tokens in the main model's KV cache and the next token t_N chosen:
1. draft: MTP module k, at position N - 1, reads the previous module's hidden state and the
   embedding of the token k positions on (t_N, then the drafts), and proposes d_k;
2. verify: one main-model forward over [t_N, d_1 .. d_D] (through the KV cache) gives the main
   model's distribution after each of them;
3. accept: greedy keeps the drafts that equal the main model's argmax, then adds the main
   model's own next token, so the output is token for token plain greedy decoding. Sampling
   uses standard speculative sampling (accept d with probability min(1, p(d) / q(d)), else
   draw from norm(max(0, p - q))), so tokens follow the main model's distribution;
4. roll back: the main cache is truncated to the accepted tokens (`KVCache.truncate`).

The MTP modules keep their own one-layer caches. Module k's input at position i needs token
i + k, which is known for i <= N - k; each round the modules re-run the few positions after
the last one every module had real inputs for (about 2 D positions), and their caches are
cut back to it. With one sequence at a time (B = 1). Once the context reaches block_size,
decoding continues exactly as plain decoding does (no drafts).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..core.errors import LlmctlError
from .sampling import check_sampling, draw, mask_padding, next_token_probs


@dataclass
class SpeculativeStats:
    drafted: int = 0  # draft tokens proposed for verification
    accepted: int = 0  # of those, accepted
    main_forwards: int = 0  # main-model forwards after the prefill (verify or plain steps)
    tokens: int = 0  # tokens yielded

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted, in [0, 1] (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Tokens per main-model forward: the speed-up over plain decoding if drafts were free."""
        return self.tokens / (self.main_forwards + 1)

    def to_dict(self) -> dict[str, float]:
        return {"drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": round(self.acceptance_rate, 4),
                "main_forwards": self.main_forwards + 1,
                "tokens_per_forward": round(self.tokens_per_forward, 3)}


class _Drafter:
    """The MTP modules with their caches, over positions [committed, N)."""

    def __init__(self, model: torch.nn.Module, hidden: torch.Tensor):
        from ..model.cache import KVCache

        self.model = model
        self.caches = [KVCache(1, capacity=model.config.block_size) for _ in model.mtp]
        self.committed = 0  # every module has real inputs for positions < committed
        self.pending = hidden  # (1, N - committed, C): main hidden states from `committed`

    def draft(self, seq: list[int], n_drafts: int, sample) -> tuple[list[int], list[torch.Tensor]]:
        """Drafts d_1..d_D (D = number of modules) after seq[-1] = t_N and their draft
        distributions; only the first n_drafts are verified but every module runs, so that
        all caches advance together."""
        from ..model.positional import Positions

        model, c = self.model, self.committed
        N = len(seq) - 1
        device = self.pending.device
        hidden, drafts, probs = self.pending, [], []
        for k, (module, cache) in enumerate(zip(model.mtp, self.caches, strict=True), start=1):
            ids = (seq + drafts)[c + k: N + k]  # tokens i + k for positions i in [c, N)
            embedded = model.wte(torch.tensor([ids], device=device))  # (1, N - c, C)
            pos = Positions(c, N - c, device, model.config.rope_theta)
            hidden, _ = module(hidden, embedded, pos, cache.layers[0])  # (1, N - c, C)
            logits = model.lm_head(module.norm_f(hidden[:, -1]))  # (1, V)
            token, p = sample(logits)
            drafts.append(token)
            probs.append(p)
        # Module k had real tokens for positions <= N - k: keep what holds for every module.
        keep = max(c, N - len(model.mtp) + 1)
        for cache in self.caches:
            cache.truncate(keep)
        self.pending = self.pending[:, keep - c:]
        self.committed = keep
        return drafts[:n_drafts], probs[:n_drafts]

    def extend(self, hidden: torch.Tensor) -> None:
        """Main-model hidden states of newly accepted positions (1, n, C)."""
        self.pending = torch.cat((self.pending, hidden), dim=1)


@torch.no_grad()
def stream_speculative(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, *,
                       temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, eot_id: int | None = None,
                       generator: torch.Generator | None = None,
                       vocab_limit: int | None = None, max_drafts: int | None = None,
                       stats: SpeculativeStats | None = None) -> Iterator[torch.Tensor]:
    """Like `decode.stream_tokens` (same arguments, (1,) tensors), drafting up to
    `max_drafts` (default: mtp_depth) tokens per main forward; `stats` is filled in."""
    check_sampling(temperature, top_k, top_p)
    depth = len(getattr(model, "mtp", ()))
    if depth == 0:
        raise LlmctlError("speculative decoding needs a model trained with mtp_depth >= 1 "
                          "(its multi-token prediction modules draft the tokens)")
    if idx.dim() != 2 or idx.size(0) != 1 or idx.size(1) == 0:
        raise ValueError(f"speculative decoding takes one prompt (1, T), got {tuple(idx.shape)}")
    stats = stats if stats is not None else SpeculativeStats()
    max_drafts = depth if max_drafts is None else max(0, min(max_drafts, depth))
    if max_new_tokens <= 0:
        return
    block_size = model.config.block_size
    greedy = temperature == 0

    def distribution(logits: torch.Tensor) -> torch.Tensor:  # (n, V) -> (n, V)
        return next_token_probs(mask_padding(logits, vocab_limit), temperature, top_k, top_p)

    def pick(p: torch.Tensor) -> int:  # (V,) -> a token id
        if greedy:
            return int(p.argmax())
        return int(draw(p[None], generator)[0])

    def sample(logits: torch.Tensor) -> tuple[int, torch.Tensor]:
        p = distribution(logits)[0]
        return pick(p), p

    was_training = model.training
    model.eval()
    try:
        context = idx[:, -block_size:]
        out = model(context, use_cache=True, return_hidden=True)
        cache, seq = out.kv_cache, context[0].tolist()
        drafter = _Drafter(model, out.hidden)
        token = pick(distribution(out.logits[:, -1])[0])
        produced = 0
        while True:
            produced += 1
            stats.tokens += 1
            yield torch.tensor([token], device=idx.device)
            if (eot_id is not None and token == eot_id) or produced >= max_new_tokens:
                return
            seq.append(token)
            if cache is None or cache.length >= block_size:  # window full: plain decoding
                token = pick(distribution(_plain_step(model, cache, seq, block_size))[0])
                cache = cache if model.config.pos_emb == "alibi" else None
                stats.main_forwards += 1
                continue
            room = block_size - cache.length - 1  # drafts that fit beside t_N in the cache
            # drafts beyond the tokens still wanted would be wasted work
            n_drafts = min(max_drafts, room, max_new_tokens - produced - 1)
            drafts, draft_probs = drafter.draft(seq, n_drafts, sample) if n_drafts else ([], [])
            verify = torch.tensor([[token, *drafts]], device=idx.device)  # (1, 1 + n)
            out = model(verify, kv_cache=cache, return_hidden=True)
            stats.main_forwards += 1
            target = distribution(out.logits[0])  # (1 + n, V)
            accepted, token = _accept(drafts, draft_probs, target, greedy, generator, pick)
            stats.drafted += len(drafts)
            stats.accepted += accepted
            cache.truncate(cache.length - len(drafts) + accepted)
            drafter.extend(out.hidden[:, : accepted + 1])
            for d in drafts[:accepted]:
                produced += 1
                stats.tokens += 1
                yield torch.tensor([d], device=idx.device)
                if (eot_id is not None and d == eot_id) or produced >= max_new_tokens:
                    return
                seq.append(d)
    finally:
        model.train(was_training)


def _accept(drafts: list[int], draft_probs: list[torch.Tensor], target: torch.Tensor,
            greedy: bool, generator: torch.Generator | None, pick) -> tuple[int, int]:
    """(number of drafts accepted, the main model's next token after them)."""
    for j, (d, q) in enumerate(zip(drafts, draft_probs, strict=True)):
        p = target[j]
        if greedy:
            if int(p.argmax()) == d:
                continue
            return j, int(p.argmax())
        u = torch.rand((), generator=generator, device=p.device)
        if u * q[d] < p[d]:  # accept with probability min(1, p(d) / q(d))
            continue
        residual = (p - q).clamp_min(0)
        total = residual.sum()
        return j, pick(residual / total if total > 0 else p)
    return len(drafts), pick(target[len(drafts)])


def _plain_step(model: torch.nn.Module, cache, seq: list[int], block_size: int) -> torch.Tensor:
    """What `decode.stream_tokens` does once the window is full: slide an ALiBi cache, else
    re-run the cropped context. (1, V) logits of the next token."""
    device = model.wte.weight.device
    if cache is not None and model.config.pos_emb == "alibi":
        cache.drop_oldest(cache.length - block_size + 1)
        out = model(torch.tensor([[seq[-1]]], device=device), kv_cache=cache,
                    last_logits_only=True)
    else:
        out = model(torch.tensor([seq[-block_size:]], device=device), use_cache=False,
                    last_logits_only=True)
    return out.logits[:, -1]
