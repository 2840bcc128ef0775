"""Next-token sampling: temperature, top-k, top-p (nucleus), greedy at temperature 0.

    p_T(v) = softmax(logits / T)(v)
    top-k keeps the k most likely tokens; top-p keeps the smallest most-likely set whose mass
    reaches p (always at least one token); the kept probabilities are renormalised and sampled.

The returned log-probability is log p_T(token) *before* truncation: that is the policy RL
objectives model (as TRL and verl do); truncation only shapes exploration.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                top_k: int = 0, generator: Optional[torch.Generator] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits [b, V] -> (tokens [b] int64, logprobs [b] fp32 under softmax(logits / T))."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"sampling needs temperature >= 0 (got {temperature}), 0 < top_p <= 1 "
                         f"(got {top_p}) and top_k >= 0 (got {top_k})")
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0]
        return tokens, logprobs
    logprobs_all = torch.log_softmax(logits / temperature, dim=-1)
    kept = logprobs_all
    if top_k and top_k < kept.shape[-1]:
        kth = kept.topk(top_k, dim=-1).values[:, -1:]
        kept = kept.masked_fill(kept < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = kept.sort(dim=-1, descending=True)
        mass_before = sorted_lp.exp().cumsum(dim=-1) - sorted_lp.exp()
        drop_sorted = mass_before >= top_p            # the first token always stays (mass 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        kept = kept.masked_fill(drop, float("-inf"))
    probs = torch.softmax(kept, dim=-1)
    if generator is not None and generator.device != probs.device:
        # A CPU generator (seeded per rollout) with GPU logits.
        tokens = sample_inverse_cdf(probs, generator)
    else:
        tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tokens, logprobs_all.gather(-1, tokens[:, None])[:, 0]


def sample_inverse_cdf(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """probs [b, V] (rows sum to 1) -> tokens [b], one uniform per row from `generator`.

    The uniforms are drawn on the generator's device and only those b numbers cross to the
    probabilities' device: copying the [b, V] probabilities to a CPU generator would cost a
    device-to-host transfer (and a sync) per decoded token. Token v is chosen when
    cdf[v-1] <= u * cdf[V-1] < cdf[v], so zero-probability tokens (cut by top-k/top-p) never are."""
    u = torch.rand(probs.shape[0], 1, generator=generator, device=generator.device)
    cdf = probs.cumsum(dim=-1)
    target = u.to(probs.device, non_blocking=True) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, target, right=True)[:, 0]
    return tokens.clamp_(max=probs.shape[-1] - 1)  # u * total can round up to total
