"""The config sections of the optional features: their fields are flags of every run, whatever
is imported, so `--help` is always the same and a saved config always parses.

Only the schema and single-section checks live here; what each feature does with its section is
in its own package (quant/, rlp/, data/phases.py, dry_run.py), attached to a run by
megatron_rlp/extensions.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .fields import arg, fail

# --fp4-gemm: where the NVFP4 GEMMs run (quant.te_gemm.resolve_gemm turns "auto" into one of the
# others).
GEMM_CHOICES = ("auto", "emulated", "te")


@dataclass
class NVFP4Recipe:
    """Flags of the NVFP4 training recipe (section ``fp4``)."""
    fp4: Optional[str] = arg(None, "Low-precision recipe for the linear layers of the "
                                   "middle blocks: 'nvfp4' or unset (BF16).", choices=("nvfp4",))
    fp4_bf16_first_layers: int = arg(2, "Blocks kept in BF16 at the start of the network "
                                        "(2 for the 12B config; scale down for tiny models).")
    fp4_bf16_last_layers: int = arg(8, "Blocks kept in BF16 at the end of the network "
                                       "(8 for the 12B config; scale down for tiny models).")
    fp4_switch_to_bf16_at: Optional[float] = arg(
        None, "Fraction of --train-iters after which every layer trains in BF16 (e.g. 0.82).")
    use_rht: bool = arg(True, "NVFP4: random Hadamard transform on the Wgrad operands "
                              "(--no-use-rht for ablations).")
    use_sr: bool = arg(True, "NVFP4: stochastic rounding of gradients (--no-use-sr: RNE).")
    use_2d_weights: bool = arg(True, "NVFP4: 16x16 weight scaling (--no-use-2d-weights: 1x16 "
                                     "on W and on W^T).")
    fp4_gemm: str = arg("auto", "NVFP4 GEMMs: 'te' (TransformerEngine FP4 tensor cores, "
                                "Blackwell), 'emulated' (fp32 matmul of dequantized operands) "
                                "or 'auto' (te where available).", choices=GEMM_CHOICES)

    def __post_init__(self):
        if self.fp4 not in (None, "nvfp4"):
            raise ValueError(f"--fp4={self.fp4!r}: unknown recipe; use 'nvfp4' or leave it unset")
        for name in ("fp4_bf16_first_layers", "fp4_bf16_last_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"--{name.replace('_', '-')}={v!r}: must be an integer >= 0")
        if self.fp4_gemm not in GEMM_CHOICES:
            raise ValueError(f"--fp4-gemm={self.fp4_gemm!r}: use one of {', '.join(GEMM_CHOICES)}")
        f = self.fp4_switch_to_bf16_at
        if f is not None and not 0.0 <= f <= 1.0:
            raise ValueError(f"--fp4-switch-to-bf16-at={f!r}: must be a fraction in [0, 1] of "
                             "--train-iters; leave it unset to never switch")

    @property
    def enabled(self) -> bool:
        return self.fp4 == "nvfp4"


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
            fail("rlp_num_thoughts", self.rlp_num_thoughts,
                 "group-relative advantages need >= 2 thoughts per context", "pass 2 or more")
        if self.rlp_thought_length < 1:
            fail("rlp_thought_length", self.rlp_thought_length, "must be >= 1", "pass 1 or more")
        if self.rlp_temperature <= 0:
            fail("rlp_temperature", self.rlp_temperature, "must be > 0 (sampling, not greedy)",
                 "use e.g. 0.7")
        if not 0 < self.rlp_top_p <= 1:
            fail("rlp_top_p", self.rlp_top_p, "must be in (0, 1]", "use 1.0 to disable")
        if not 0 <= self.rlp_ema_decay < 1:
            fail("rlp_ema_decay", self.rlp_ema_decay, "must be in [0, 1)", "use e.g. 0.999")
        for name in ("rlp_clip_eps_low", "rlp_clip_eps_high", "rlp_kl_beta"):
            if getattr(self, name) < 0:
                fail(name, getattr(self, name), "must be >= 0", "pass a non-negative number")
        if self.rlp_clip_eps_low >= 1:
            fail("rlp_clip_eps_low", self.rlp_clip_eps_low, "must be < 1", "use e.g. 0.2")
        if self.rlp_min_prefix < 1:
            fail("rlp_min_prefix", self.rlp_min_prefix, "must be >= 1", "pass 1 or more")
        if "{context}" not in self.rlp_prompt_template:
            fail("rlp_prompt_template", self.rlp_prompt_template, "has no {context} placeholder",
                 "put {context} where the document prefix goes")
        if self.rlp_max_context is not None and self.rlp_max_context < 1:
            fail("rlp_max_context", self.rlp_max_context, "must be >= 1", "pass 1 or more")


@dataclass
class PhasesConfig:
    data_phases: Optional[str] = arg(
        None, "Phase blend YAML (tools/build_phase_blend.py): switch data blends at phase "
              "boundaries within one run; overrides --data-path for training.")


@dataclass
class DryRunConfig:
    dry_run_world_size: Optional[int] = arg(
        None, "--dry-run: GPUs to plan for (default TP x PP, one data-parallel replica).")
    dry_run_vocab_size: Optional[int] = arg(
        None, "--dry-run: vocabulary size to assume (default: the tokenizer's).")
