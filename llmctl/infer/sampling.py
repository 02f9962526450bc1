"""The next token from a step's logits: the settings' checks, temperature, top-k, top-p and
the draw itself, one home for every decoding path (cached, fast, speculative).

A draw inverts the cumulative distribution with one uniform number per row: the weights are
summed in float64 in token-id order and the first token whose running sum passes u * total
is chosen. That is exact in distribution and costs one random number, where
`torch.multinomial` draws an exponential for every token of the vocabulary (on a CPU, 8192
of them take longer than a small model's whole decoding step). A token of weight zero is
never chosen; a token whose weight is below 2^-53 of the total in float64 may never be.
One row under top-k alone (a decoding step's usual draw) sums only the weights of its kept
tokens, in id order: the same running sums as the masked row's, whose other weights are
zeros, so the same token for the same number, without five more passes over the vocabulary.
"""

from __future__ import annotations

import torch

from ..core.errors import LlmctlError

# A temperature divides the logits: below this the softmax is greedy in all but name (and
# 1e-45 turns logits into inf / NaN); above it the distribution is uniform noise.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 100.0


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Reject sampling settings that make no sense (a clear error, not a NaN later)."""
    if temperature != 0 and not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        # also catches NaN and inf
        raise LlmctlError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, "
                          f"{MAX_TEMPERATURE:g}], got {temperature}")
    if isinstance(top_k, bool) or (top_k is not None and not isinstance(top_k, int)):
        raise LlmctlError(f"top_k must be a whole number >= 0 (0 = off), got {top_k!r}")
    if top_k is not None and top_k < 0:
        raise LlmctlError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise LlmctlError(f"top_p must be in (0, 1], got {top_p}")


def mask_padding(logits: torch.Tensor, vocab_limit: int | None) -> torch.Tensor:
    """The logits with the ids from `vocab_limit` on (a padded vocabulary's) set to -inf."""
    if vocab_limit is not None and vocab_limit < logits.size(-1):
        logits = logits.clone()
        logits[..., vocab_limit:] = float("-inf")
    return logits


def truncates_top_k(k: int | None, vocab: int) -> bool:
    """Whether top-k leaves out some of `vocab` ids (k None or 0 is off)."""
    return bool(k) and k < vocab


def truncates_top_p(p: float | None) -> bool:
    """Whether a nucleus of probability p can leave out any token (p None or >= 1 is off)."""
    return p is not None and p < 1


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits per row, set the rest to -inf (k None/0 or >= V: no-op)."""
    if not truncates_top_k(k, logits.size(-1)):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sums to
    at least p (always at least one), set the rest to -inf (p None or >= 1: no-op)."""
    if not truncates_top_p(p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly better tokens
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _filtered(scaled: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Temperature-scaled logits after top-k, then top-p."""
    return top_p_filter(top_k_filter(scaled, top_k), top_p)


def next_token_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None) -> torch.Tensor:
    """(B, V) logits -> (B, V) sampling distribution after temperature, top-k and top-p.

    temperature 0 gives a one-hot on the argmax (greedy)."""
    if temperature == 0:
        logits = logits.float()
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return _filtered(logits.float() / temperature, top_k, top_p).softmax(dim=-1)


def unnormalised_weights(scaled: torch.Tensor) -> torch.Tensor:
    """(B, V) temperature-scaled, filtered logits -> exp(logit - row max): the softmax
    without its division (`draw` takes any positive multiple of the probabilities)."""
    return (scaled - scaled.amax(dim=-1, keepdim=True)).exp_()


def _cdf_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def invert_cdf(cdf: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """(B, V) running sums of non-negative weights, (B, 1) numbers in [0, 1) -> (B,) ids:
    per row the first token whose running sum exceeds uniform * total."""
    # uniform < 1 keeps u < total after rounding (total * (1 - uniform) is at least half a
    # unit in the last place of total), so the first running sum past u is at the latest the
    # last weighted token's; a token of weight zero repeats the sum before it, never first
    u = uniform * cdf[:, -1:]  # (B, 1)
    return torch.searchsorted(cdf, u, right=True)[:, 0]


def draw(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) non-negative weights (probabilities, or any positive multiple) -> (B,) ids,
    each drawn with probability weight / row total."""
    cdf = weights.to(_cdf_dtype(weights.device)).cumsum(dim=-1)  # (B, V)
    total = cdf[:, -1:]
    if not bool(((total > 0) & total.isfinite()).all()):
        raise LlmctlError("the next-token distribution is not finite (the model produced "
                          "NaN or infinite logits): the checkpoint's weights are broken")
    uniform = torch.rand(total.shape, dtype=cdf.dtype, device=cdf.device, generator=generator)
    return invert_cdf(cdf, uniform)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) next token ids."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature  # (B, V)
    if (scaled.shape[0] == 1 and truncates_top_k(top_k, scaled.shape[1])
            and not truncates_top_p(top_p)):
        chosen = _draw_top_k_row(scaled[0], top_k, generator)
        if chosen is not None:
            return chosen
    return draw(unnormalised_weights(_filtered(scaled, top_k, top_p)), generator)


def _draw_top_k_row(scaled: torch.Tensor, k: int,
                    generator: torch.Generator | None) -> torch.Tensor | None:
    """The top-k draw of one (V,) row of scaled logits over its kept tokens only (those at
    least its k-th largest, ties kept, in id order), or None for a row with a NaN (the full
    draw says what is wrong: no comparison would keep it)."""
    top = torch.topk(scaled, k).values  # (k,) descending, a NaN first
    if bool(top[0].isnan()):
        return None
    kept = (scaled >= top[-1]).nonzero()[:, 0]  # (n,) ids, n >= k
    return kept[draw(unnormalised_weights(scaled[kept][None]), generator)]  # (1,)
