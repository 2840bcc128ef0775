"""The `rlp` config section: its fields become `--rlp-*` flags (and YAML keys)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_rlp.config import _fail, arg, register_section

DEFAULT_TEMPLATE = ("Continue the text. Before writing the next token, think about what comes "
                    "next.\n\n{context}")


@dataclass
class RLPConfig:
    rlp_num_thoughts: int = arg(16, "G: thoughts sampled per context (group size, >= 2).")
    rlp_thought_length: int = arg(2048, "Maximum thought tokens (a thought stops at </think>).")
    rlp_temperature: float = arg(0.7, "Sampling temperature of thoughts (> 0).")
    rlp_top_p: float = arg(1.0, "Nucleus mass for thought sampling.")
    rlp_top_k: int = arg(0, "Top-k for thought sampling (0: off).")
    rlp_ema_decay: float = arg(0.999, "tau of the EMA teacher: phi <- tau*phi + (1-tau)*theta.")
    rlp_clip_eps_low: float = arg(0.2, "Lower clip of the importance ratio (1 - eps_low).")
    rlp_clip_eps_high: float = arg(0.2, "Upper clip of the importance ratio (1 + eps_high).")
    rlp_kl_beta: float = arg(0.0, "Weight of a k3 KL penalty to the EMA teacher on thought tokens.")
    rlp_reward: str = arg("info_gain", "info_gain: log p_theta(x_t|x_<t,c) - log p_phi(x_t|x_<t); "
                          "rpt: 1 iff the prediction after the thought is a byte-prefix of the "
                          "true continuation ending on a token boundary.",
                          choices=("info_gain", "rpt"))
    rlp_min_prefix: int = arg(16, "Fewest tokens of t's own document before the predicted "
                              "position t (contexts never reach into another document).")
    rlp_max_context: Optional[int] = arg(None, "Keep at most this many context tokens (the last "
                                         "ones of t's document).")
    rlp_prompt_template: str = arg(DEFAULT_TEMPLATE, "Prompt text around the context; must contain "
                                   "{context}. <think> is appended after it.")
    rlp_rpt_entropy_filter: Optional[float] = arg(
        None, "RPT: choose t only where the teacher's top-16 entropy (nats) is >= this.")
    rlp_rpt_truth_tokens: int = arg(8, "RPT: ground-truth continuation tokens the prefix is checked against.")

    def __post_init__(self):
        if self.rlp_num_thoughts < 2:
            _fail("rlp_num_thoughts", self.rlp_num_thoughts,
                  "group-relative advantages need >= 2 thoughts per context", "pass 2 or more")
        if self.rlp_thought_length < 1:
            _fail("rlp_thought_length", self.rlp_thought_length, "must be >= 1", "pass 1 or more")
        if self.rlp_temperature <= 0:
            _fail("rlp_temperature", self.rlp_temperature, "must be > 0 (sampling, not greedy)",
                  "use e.g. 0.7")
        if not 0 < self.rlp_top_p <= 1:
            _fail("rlp_top_p", self.rlp_top_p, "must be in (0, 1]", "use 1.0 to disable")
        if not 0 <= self.rlp_ema_decay < 1:
            _fail("rlp_ema_decay", self.rlp_ema_decay, "must be in [0, 1)", "use e.g. 0.999")
        for name in ("rlp_clip_eps_low", "rlp_clip_eps_high", "rlp_kl_beta"):
            if getattr(self, name) < 0:
                _fail(name, getattr(self, name), "must be >= 0", "pass a non-negative number")
        if self.rlp_clip_eps_low >= 1:
            _fail("rlp_clip_eps_low", self.rlp_clip_eps_low, "must be < 1", "use e.g. 0.2")
        if self.rlp_min_prefix < 1:
            _fail("rlp_min_prefix", self.rlp_min_prefix, "must be >= 1", "pass 1 or more")
        if "{context}" not in self.rlp_prompt_template:
            _fail("rlp_prompt_template", self.rlp_prompt_template, "has no {context} placeholder",
                  "put {context} where the document prefix goes")
        if self.rlp_max_context is not None and self.rlp_max_context < 1:
            _fail("rlp_max_context", self.rlp_max_context, "must be >= 1", "pass 1 or more")


register_section("rlp", RLPConfig)
