"""Pure functions for multi-phase data blends: token budgets, epochs per source, sample accounting.

Two-phase pretraining (Feng et al. 2024, "Maximize Your Data's Potential"): phase 1 trains on a
diverse blend close to the natural distribution (medium- and low-quality web included), phase 2
moves weight to high-quality tiers and math/code, with an epoch cap per tier so small high-quality
sources are not repeated past usefulness. Nemotron-CC style runs split tokens about 60/40.

Planning (`plan_phases`), for sources s with `tokens_s` and phases p with fraction `f_p` of the
total budget T:

    w_{p,s}  = tokens_s * tier_weight_p[tier_s] * category_boost_p.get(category_s, 1)
    share_{p,s} = w_{p,s} / sum_s w_{p,s}                    (the Megatron blend weight)
    tokens_{p,s} = T * f_p * share_{p,s}
    epochs_s = sum_p tokens_{p,s} / tokens_s  <=  epoch_cap[tier_s]

Every quantity is linear in T, so the largest budget that respects all caps is
`min_s cap_s * tokens_s / sum_p f_p * share_{p,s}` (`max_total_tokens`); a larger T is rejected
naming the sources that would break their cap.

Sample accounting (`phase_sample_budgets`, `locate`, `samples_per_phase`): a phase of B tokens
holds round(B / seq_length) samples, rounded to whole global batches so no optimizer step mixes
two phases. Phase k covers global samples [start_k, start_k + n_k); the last phase absorbs any
samples a run asks for beyond the blend's budget. Where sample i lives is a pure function of i,
so a resumed run (which knows only consumed_samples) reads what the uninterrupted run would.

Source names (`source_names`): validation reports `valid_loss/<name>` per source of a blend, named
from its prefixes: the file name without tools/preprocess_data.py's `_<json key>_document` suffix
(`data/web_text_document` -> `web`); names that clash keep the whole file name, then as many
parent folders as it takes (`v1/web_text_document`, `v2/web_text_document`).
"""
from __future__ import annotations

import bisect
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

DEFAULT_EPOCH_CAPS = {"high": 4.0, "medium": 2.0, "low": 1.0}
DEFAULT_SPLIT = (0.6, 0.4)
# Phase 1 keeps the natural distribution; phase 2 drops the low tier, shrinks the medium tier and
# doubles math and code (the categories the paper finds most valuable late in training).
DEFAULT_PHASE1_TIER_WEIGHTS = {"high": 1.0, "medium": 1.0, "low": 1.0}
DEFAULT_PHASE2_TIER_WEIGHTS = {"high": 1.0, "medium": 0.25, "low": 0.0}
DEFAULT_PHASE2_CATEGORY_BOOST = {"math": 2.0, "code": 2.0}


@dataclass(frozen=True)
class Source:
    """One tokenised source: a Megatron prefix of `tokens` tokens in a quality `tier`."""
    name: str
    category: str
    tier: str
    tokens: int
    path: str

    def __post_init__(self):
        if not self.name:
            raise ValueError(f"source with path {self.path!r} has an empty name; give each a name")
        if not isinstance(self.tokens, int) or self.tokens <= 0:
            raise ValueError(f"source {self.name!r}: tokens={self.tokens!r} must be a positive int "
                             "(empty sources cannot be blended; leave them out of the manifest)")


@dataclass(frozen=True)
class PhaseSpec:
    """How one phase weighs sources; `fraction` is its share of the total token budget."""
    name: str
    fraction: float
    tier_weights: Mapping[str, float]
    category_boost: Mapping[str, float] = field(default_factory=dict)


@dataclass
class PhasePlan:
    name: str
    tokens: int                       # token budget of the phase
    shares: dict                      # source name -> blend weight (sums to 1 over used sources)
    source_tokens: dict               # source name -> tokens read from it in this phase


@dataclass
class BlendPlan:
    sources: list
    phases: list
    epoch_caps: dict

    @property
    def total_tokens(self) -> int:
        return sum(p.tokens for p in self.phases)

    def epochs(self, source: str, phase: Optional[str] = None) -> float:
        """Passes over `source` in one phase (or the whole run when `phase` is None)."""
        size = next(s.tokens for s in self.sources if s.name == source)
        used = sum(p.source_tokens.get(source, 0) for p in self.phases
                   if phase is None or p.name == phase)
        return used / size


def default_phases(split: Sequence[float] = DEFAULT_SPLIT) -> list[PhaseSpec]:
    """The two-phase recipe: diverse phase 1, quality-upweighted phase 2."""
    if len(split) != 2:
        raise ValueError(f"--phase-split {list(split)} must have two fractions (phase 1, phase 2)")
    return [PhaseSpec("phase1", split[0], DEFAULT_PHASE1_TIER_WEIGHTS),
            PhaseSpec("phase2", split[1], DEFAULT_PHASE2_TIER_WEIGHTS,
                      DEFAULT_PHASE2_CATEGORY_BOOST)]


def phase_shares(sources: Sequence[Source], spec: PhaseSpec) -> dict:
    """Blend weight per source in a phase (sources of weight 0 are left out)."""
    raw = {}
    for s in sources:
        if s.tier not in spec.tier_weights:
            raise ValueError(f"phase {spec.name!r} has no tier weight for tier {s.tier!r} of source "
                             f"{s.name!r}; known tiers: {sorted(spec.tier_weights)}")
        w = s.tokens * float(spec.tier_weights[s.tier]) * float(spec.category_boost.get(s.category,
                                                                                        1.0))
        if w < 0 or not math.isfinite(w):
            raise ValueError(f"phase {spec.name!r}: weight for {s.name!r} is {w}; tier weights and "
                             "category boosts must be finite and >= 0")
        if w > 0:
            raw[s.name] = w
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"phase {spec.name!r} gives every source weight 0; raise a tier weight")
    return {name: w / total for name, w in raw.items()}


def _check_inputs(sources: Sequence[Source], phases: Sequence[PhaseSpec],
                  epoch_caps: Mapping[str, float]) -> None:
    if not sources:
        raise ValueError("the manifest lists no sources")
    names = [s.name for s in sources]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"source names must be unique; repeated: {dup}")
    if not phases:
        raise ValueError("at least one phase is needed")
    fractions = [p.fraction for p in phases]
    if any(not math.isfinite(f) or f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"--phase-split {fractions} must be positive fractions summing to 1, "
                         "e.g. 0.6 0.4")
    for s in sources:
        if s.tier not in epoch_caps:
            raise ValueError(f"source {s.name!r} has tier {s.tier!r} with no epoch cap; known "
                             f"tiers {sorted(epoch_caps)}; add one with --epoch-cap {s.tier}=N")
    for tier, cap in epoch_caps.items():
        if not math.isfinite(cap) or cap <= 0:
            raise ValueError(f"--epoch-cap {tier}={cap} must be a positive number of epochs")


def max_total_tokens(sources: Sequence[Source], phases: Sequence[PhaseSpec],
                     epoch_caps: Mapping[str, float] = DEFAULT_EPOCH_CAPS) -> int:
    """The largest total budget for which no source exceeds its tier's epoch cap."""
    _check_inputs(sources, phases, epoch_caps)
    usage = {s.name: 0.0 for s in sources}  # tokens read from s per token of total budget
    for spec in phases:
        for name, share in phase_shares(sources, spec).items():
            usage[name] += spec.fraction * share
    limits = [epoch_caps[s.tier] * s.tokens / usage[s.name] for s in sources if usage[s.name] > 0]
    return int(math.floor(min(limits) * (1 - 1e-9)))


def plan_phases(sources: Sequence[Source], total_tokens: int,
                phases: Optional[Sequence[PhaseSpec]] = None,
                epoch_caps: Mapping[str, float] = DEFAULT_EPOCH_CAPS) -> BlendPlan:
    """Split `total_tokens` over phases and sources; raise ValueError if a cap would be broken."""
    phases = list(phases) if phases is not None else default_phases()
    _check_inputs(sources, phases, epoch_caps)
    if not isinstance(total_tokens, int) or total_tokens <= 0:
        raise ValueError(f"--total-tokens={total_tokens!r} must be a positive integer")
    plans, assigned = [], 0
    for k, spec in enumerate(phases):
        # The last phase takes the rounding remainder so phase budgets add up to the total exactly.
        tokens = total_tokens - assigned if k == len(phases) - 1 \
            else int(round(total_tokens * spec.fraction))
        assigned += tokens
        shares = phase_shares(sources, spec)
        plans.append(PhasePlan(spec.name, tokens, shares,
                               {n: tokens * w for n, w in shares.items()}))
    plan = BlendPlan(list(sources), plans, dict(epoch_caps))
    over = [(s, plan.epochs(s.name)) for s in sources
            if plan.epochs(s.name) > epoch_caps[s.tier] * (1 + 1e-9)]
    if over:
        detail = "; ".join(f"{s.name} (tier {s.tier}, {s.tokens:,} tokens) would be read "
                           f"{e:.2f} epochs, cap {epoch_caps[s.tier]:g}" for s, e in over)
        limit = max_total_tokens(sources, phases, epoch_caps)
        raise ValueError(
            f"--total-tokens={total_tokens:,} exceeds the epoch cap of {len(over)} source(s): "
            f"{detail}. The largest budget within every cap is {limit:,} tokens; lower "
            f"--total-tokens, raise --epoch-cap for those tiers, or add data")
    return plan


def format_table(plan: BlendPlan) -> str:
    """Tokens and epochs per source per phase, as a fixed-width text table."""
    names = [p.name for p in plan.phases]
    head = ["source", "category", "tier", "tokens"]
    for n in names:
        head += [f"{n} weight", f"{n} tokens", f"{n} epochs"]
    head += ["total epochs", "cap"]
    rows = []
    for s in plan.sources:
        row = [s.name, s.category, s.tier, f"{s.tokens:,}"]
        for p in plan.phases:
            row += [f"{p.shares.get(s.name, 0.0):.4f}", f"{round(p.source_tokens.get(s.name, 0)):,}",
                    f"{plan.epochs(s.name, p.name):.3f}"]
        row += [f"{plan.epochs(s.name):.3f}", f"{plan.epoch_caps[s.tier]:g}"]
        rows.append(row)
    total = ["TOTAL", "", "", f"{sum(s.tokens for s in plan.sources):,}"]
    for p in plan.phases:
        total += ["1.0000", f"{p.tokens:,}", ""]
    total += ["", ""]
    rows.append(total)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# sample accounting
# ----------------------------------------------------------------------------------------------
def phase_sample_budgets(phase_tokens: Sequence[int], seq_length: int,
                         global_batch_size: int = 1) -> list[int]:
    """Samples per phase: tokens / seq_length, rounded to whole global batches (at least one)."""
    if seq_length < 1 or global_batch_size < 1:
        raise ValueError(f"seq_length={seq_length} and global_batch_size={global_batch_size} "
                         "must be >= 1")
    out = []
    for tokens in phase_tokens:
        batches = max(1, int(round(tokens / (seq_length * global_batch_size))))
        out.append(batches * global_batch_size)
    return out


def phase_starts(budgets: Sequence[int]) -> list[int]:
    """Global index of each phase's first sample."""
    starts, acc = [], 0
    for n in budgets:
        starts.append(acc)
        acc += n
    return starts


def locate(sample: int, budgets: Sequence[int]) -> tuple[int, int]:
    """(phase index, index inside that phase) of global sample `sample`; past the end of the
    blend the last phase continues."""
    if sample < 0:
        raise ValueError(f"sample index {sample} must be >= 0")
    starts = phase_starts(budgets)
    k = bisect.bisect_right(starts, sample) - 1
    return k, sample - starts[k]


def samples_per_phase(consumed_samples: int, budgets: Sequence[int]) -> list[int]:
    """How many of the first `consumed_samples` samples each phase supplied."""
    out, left = [], consumed_samples
    for k, n in enumerate(budgets):
        take = left if k == len(budgets) - 1 else min(left, n)
        out.append(take)
        left -= take
    return out


# ----------------------------------------------------------------------------------------------
# source names
# ----------------------------------------------------------------------------------------------
_PREPROCESS_SUFFIX = re.compile(r"_[^_]+_document$")  # tools/preprocess_data.py: _<key>_document
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-/]")        # keeps names usable as tensorboard tags


def _name_at(parts: list, level: int) -> str:
    """Level 0: the short name; level k >= 1: the last k path components."""
    if level == 0:
        return _PREPROCESS_SUFFIX.sub("", parts[-1]) or parts[-1]
    return "/".join(parts[-level:])


def source_names(prefixes: Sequence[str]) -> list[str]:
    """Readable, unique names for distinct prefixes, in order (see the module docstring)."""
    paths = [os.path.normpath(os.path.abspath(p)).strip(os.sep).split(os.sep) for p in prefixes]
    repeated = sorted({p for p, n in Counter(map(tuple, paths)).items() if n > 1})
    if repeated:
        raise ValueError(f"prefix {os.sep + os.sep.join(repeated[0])} is listed twice; "
                         "name each source once")
    levels = [0] * len(paths)
    while True:
        names = [_NAME_UNSAFE.sub("_", _name_at(parts, level)) for parts, level in
                 zip(paths, levels)]
        counts = Counter(names)
        clashing = [i for i, name in enumerate(names) if counts[name] > 1]
        growable = [i for i in clashing if levels[i] < len(paths[i])]
        if not growable:
            break
        for i in growable:
            levels[i] += 1
    # Whole paths that differ only in characters the tag rule replaced: number them.
    seen: Counter = Counter()
    for i in clashing:
        seen[names[i]] += 1
        names[i] = f"{names[i]}-{seen[names[i]]}"
    return names
