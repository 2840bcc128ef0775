"""Which layers train in NVFP4, and when training switches to BF16: pure functions of the config.

Selection is by block index and block kind (the hybrid pattern character), never by module names:
the first ``fp4_bf16_first_layers`` and the last ``fp4_bf16_last_layers`` blocks stay BF16 (the
NVFP4 pretraining recipe keeps the edges of the network in higher precision); all other blocks
run the linear layers listed in ``FP4_LINEARS`` in NVFP4. Inside every block the non-linear parts
(norms, Mamba conv/SSM, the attention core softmax/QK^T/AV) stay BF16/FP32, as do the embedding
and the output layer.

From iteration ``switch_iteration(train_iters, fp4_switch_to_bf16_at)`` on, every layer is BF16. The
decision depends only on the iteration number, so a resumed run switches at the same step.

Stochastic-rounding seeds are a hash of (seed, iteration, layer, role): nothing to checkpoint, and a
resumed run draws exactly the numbers the uninterrupted run would have drawn.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Optional

from megatron_rlp.config import LAYER_SYMBOLS, NVFP4Recipe, check_hybrid_pattern

# Linear layers that become NVFP4 in an FP4 block, by kind (megatron-core submodule roles).
FP4_LINEARS = {
    "mamba": ("in_proj", "out_proj"),
    "attention": ("linear_qkv", "linear_proj"),
    "mlp": ("linear_fc1", "linear_fc2"),
}
# Stochastic-rounding roles inside one NVFP4 linear (see nvfp4_linear.py).
SR_ROLES = ("dgrad_grad", "wgrad_grad")


@dataclass(frozen=True)
class LayerPrecision:
    index: int          # global block index (0-based), independent of pipeline stage
    symbol: str         # hybrid pattern character
    kind: str           # mamba | attention | mlp
    precision: str      # nvfp4 | bf16
    reason: str         # why (e.g. "first 2 blocks", "fp4 off")

    @property
    def linears(self) -> tuple[str, ...]:
        """The linear roles of this block that run in NVFP4 (empty for BF16 blocks)."""
        return FP4_LINEARS[self.kind] if self.precision == "nvfp4" else ()


def precision_plan(num_layers: int, pattern: str, bf16_first_layers: int, bf16_last_layers: int,
                   fp4: Optional[str] = "nvfp4") -> list[LayerPrecision]:
    """Per-block precision, by index and kind. ``fp4=None`` gives an all-BF16 plan."""
    check_hybrid_pattern(num_layers, pattern)
    for name, v in (("fp4_bf16_first_layers", bf16_first_layers),
                    ("fp4_bf16_last_layers", bf16_last_layers)):
        if v < 0:
            raise ValueError(f"--{name.replace('_', '-')}={v}: must be >= 0")
    plan = []
    for i, sym in enumerate(pattern):
        if fp4 != "nvfp4":
            prec, why = "bf16", "fp4 off"
        elif i < bf16_first_layers:
            prec, why = "bf16", f"first {bf16_first_layers} blocks"
        elif i >= num_layers - bf16_last_layers:
            prec, why = "bf16", f"last {bf16_last_layers} blocks"
        else:
            prec, why = "nvfp4", "middle block"
        plan.append(LayerPrecision(i, sym, LAYER_SYMBOLS[sym], prec, why))
    return plan


def plan_for(recipe: NVFP4Recipe, num_layers: int, pattern: str) -> list[LayerPrecision]:
    return precision_plan(num_layers, pattern, recipe.fp4_bf16_first_layers,
                          recipe.fp4_bf16_last_layers, recipe.fp4)


def format_plan(plan: list[LayerPrecision], recipe: Optional[NVFP4Recipe] = None,
                train_iters: Optional[int] = None) -> str:
    """A table for the start-up log: one line per block plus a summary line."""
    lines = ["layer  kind       precision  nvfp4 linears            reason",
             "-----  ---------  ---------  -----------------------  ------------------"]
    for p in plan:
        lin = ",".join(p.linears) or "-"
        lines.append(f"{p.index:5d}  {p.kind:<9}  {p.precision:<9}  {lin:<23}  {p.reason}")
    n4 = sum(p.precision == "nvfp4" for p in plan)
    summary = f"NVFP4 blocks: {n4}/{len(plan)}"
    if recipe is not None and recipe.enabled:
        summary += (f"; rht={recipe.use_rht} sr={recipe.use_sr} "
                    f"2d_weights={recipe.use_2d_weights}")
        if recipe.fp4_switch_to_bf16_at is not None and train_iters is not None:
            it = switch_iteration(train_iters, recipe.fp4_switch_to_bf16_at)
            summary += f"; all BF16 from iteration {it} of {train_iters}"
    lines.append(summary)
    return "\n".join(lines)


def scaled_bf16_layers(num_layers: int, first_12b: int = 2, last_12b: int = 8,
                       layers_12b: int = 62) -> tuple[int, int]:
    """Scale the 12B recipe's BF16 edge counts (2 first, 8 last of 62 blocks) to ``num_layers``,
    keeping at least one BF16 block at each edge and at least one NVFP4 block when possible."""
    first = max(1, round(first_12b * num_layers / layers_12b))
    last = max(1, round(last_12b * num_layers / layers_12b))
    while first + last >= num_layers and last > 1:
        last -= 1
    while first + last >= num_layers and first > 0:
        first -= 1
    return first, last


def switch_iteration(train_iters: int, fraction: Optional[float]) -> Optional[int]:
    """First (0-based) iteration that runs all-BF16, or None if training never switches.

    Rounded to the nearest iteration (0.82 * 100 is 82.00000000000001 in floating point; floor or
    ceil would make the answer depend on that noise)."""
    if fraction is None:
        return None
    if train_iters <= 0:
        raise ValueError(f"--train-iters={train_iters}: must be > 0")
    return int(round(fraction * train_iters))


def fp4_active(recipe: NVFP4Recipe, iteration: int, train_iters: int) -> bool:
    """Whether NVFP4 blocks run in NVFP4 at (0-based, completed-iterations) ``iteration``."""
    if not recipe.enabled:
        return False
    it = switch_iteration(train_iters, recipe.fp4_switch_to_bf16_at)
    return it is None or iteration < it


def sr_seed(seed: int, iteration: int, layer: int, role: str, microbatch: int = 0,
            tp_rank: int = 0) -> int:
    """62-bit Philox seed for one NVFP4 linear call, a pure hash of its arguments (resume-exact).

    role: the linear inside the block (e.g. "in_proj"); microbatch: index within the iteration (so
    gradient-accumulation steps draw independently); tp_rank: separates the shards of one layer.
    """
    key = f"nvfp4-sr|{seed}|{iteration}|{layer}|{role}|{microbatch}|{tp_rank}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 2


def replace(recipe: NVFP4Recipe, **changes) -> NVFP4Recipe:
    """``dataclasses.replace`` that re-runs the checks."""
    return dataclasses.replace(recipe, **changes)
