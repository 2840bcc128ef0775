"""The RLP objective as pure functions: rewards -> advantages -> clipped surrogate loss.

Notation: B contexts, G thoughts each, N = B*G thought rows, T thought tokens (padded); the
thought c_i = (c_i1 .. c_iT_i) is sampled from pi_theta at temperature tau_s; x_t the target token.

Reward (information gain, RLP eq. 2-3):       r_i = log p_theta(x_t | x_<t, c_i) - log p_phi(x_t | x_<t)
  where phi is the EMA teacher without a thought. Computed without gradients.
Group-relative advantage (RLP eq. 6):          A_i = G/(G-1) * (r_i - mean_j r_j)
  no std normalisation; sum_i A_i = 0 in every group, and the G/(G-1) factor makes
  A_i = r_i - mean_{j != i} r_j (the leave-one-out baseline).
Clipped surrogate (RLP eq. 7, PPO form):
  rho_ik = pi_theta(c_ik | .) / pi_old(c_ik | .)
  L_i    = (1/T_i) sum_k min(rho_ik A_i, clip(rho_ik, 1 - eps_low, 1 + eps_high) A_i)
  loss   = -(1/N) sum_i L_i  [+ beta * (1/N) sum_i (1/T_i) sum_k k3(ref, theta)_ik]
  Only thought tokens enter: the prompt, the closing </think> we append when a thought runs out
  of length, and the target x_t carry no gradient.

Departures from the paper, and choices it leaves open:
- One optimizer step per rollout batch, so pi_old = pi_theta at the moment of the step: the
  behaviour log-probs are the training forward's own log-probs, detached (`old_logp = logp.detach()`),
  never the cached decoder's (which can differ in the last bits). The ratio is therefore exactly 1
  in value and `clip_frac` is 0; the functions below handle the general case.
- `approx_kl` in the stage's metrics is k3 = rho - 1 - log rho of the *sampler's* log-probs
  against the training forward's: it measures decoder/trainer mismatch, not a policy change.
- The ratio uses the temperature-scaled policy softmax(z/tau_s) that thoughts were sampled from;
  top-p/top-k truncation is not modelled (as in TRL and verl). Rewards use temperature 1.
- The optional KL term (off by default, as in the paper) uses the EMA teacher as the reference.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .reward import info_gain_reward  # noqa: F401  (re-exported: the objective's first equation)


def group_advantages(rewards: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
    """rewards [B, G] -> (A [B, G] = G/(G-1) (r - mean_G r), metrics).

    `equal_reward_groups` counts groups whose rewards are all equal (all advantages 0: no
    learning signal from that context)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [contexts, G >= 2], got {tuple(rewards.shape)}")
    g = rewards.shape[1]
    r = rewards.float()
    adv = g / (g - 1) * (r - r.mean(dim=1, keepdim=True))
    equal = (r.max(dim=1).values - r.min(dim=1).values) <= 1e-6 * r.abs().max(dim=1).values.clamp(min=1)
    return adv, {"reward_mean": float(r.mean()), "reward_std": float(r.std(unbiased=False)),
                 "info_gain_positive_frac": float((r > 0).float().mean()),
                 "equal_reward_groups": int(equal.sum()), "groups": int(r.shape[0])}


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.2,
                      kl_beta: float = 0.0, ref_logp: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """logp/old_logp/mask [N, T] (mask 1 on thought tokens), advantages [N] -> (loss, metrics).

    Each thought's token sum is divided by its own length, then averaged over the N thoughts."""
    mask = mask.to(logp.dtype)
    lengths = mask.sum(dim=1).clamp(min=1)
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logp.dtype)[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if kl_beta:
        if ref_logp is None:
            raise ValueError("kl_beta > 0 needs ref_logp")
        d = (ref_logp - logp) * mask
        per_token = per_token + kl_beta * (torch.exp(d) - d - 1)
    per_thought = (per_token * mask).sum(dim=1) / lengths
    loss = per_thought.mean()
    with torch.no_grad():
        was_clipped = ((ratio > 1 + eps_high) & (adv > 0)) | ((ratio < 1 - eps_low) & (adv < 0))
        n_tokens = mask.sum().clamp(min=1)
        metrics = {
            "clip_frac": (was_clipped.to(mask.dtype) * mask).sum() / n_tokens,
            "ratio_kl": ((ratio - 1 - log_ratio) * mask).sum() / n_tokens,
        }
    return loss, metrics


def k3_kl(logp_p: torch.Tensor, logp_q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked tokens of k3 = e^{q-p} - (q - p) - 1 for samples from p: >= 0, an
    unbiased estimate of KL(p || q) (Schulman's k3)."""
    d = (logp_q - logp_p) * mask
    return ((torch.exp(d) - d - 1) * mask).sum() / mask.sum().clamp(min=1)
