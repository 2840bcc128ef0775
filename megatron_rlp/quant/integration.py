"""The NVFP4 recipe applied to a built model, and its trainer callback.

    apply_nvfp4(model_chunks, cfg)   right after the model is built (train.build_model_chunks,
                                     megatron_rlp.load_model): plan once, convert each planned
                                     linear in place to the NVFP4 subclass of its megatron class
                                     (global block index from layer.layer_number, kind from the
                                     hybrid pattern, role from the spec slot), share one
                                     RecipeState; the model runs NVFP4 from then on
    NVFP4Callback                    on_train_start      print the plan
                                     on_iteration_start  iteration for SR seeds; NVFP4 -> BF16
                                     metrics             fp4_active, nvfp4_gemms

Which linears are NVFP4 is a pure function of the config, ``linear_plan(cfg)``: the block plan of
``recipe.plan_for`` (first/last blocks BF16, by index and kind), then a per-shard shape check —
the FP4 tensor-core layout needs both GEMM dimensions of the local weight to be multiples of 16
(a Mamba ``in_proj`` has 2*d_inner + 2*G*N + H rows, often not). Such a linear stays in the
run's precision and the plan table says why. Nothing is chosen by module-name patterns: roles are
the slots of the layer specs (``MambaLayer.mixer.in_proj``, ``TransformerLayer.self_attention.
linear_qkv``, ``MLPLayer.mlp.linear_fc1`` ...).

The embedding and output layer are built by ``MambaModel`` itself, not from the stack spec, so
they stay plain megatron linears (high precision) whatever the recipe says.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region)

from megatron_rlp.config import LAYER_SYMBOLS, NVFP4Recipe, RunConfig
from megatron_rlp.device import is_rank_zero
from megatron_rlp.models.hybrid import unwrap_model
from megatron_rlp.training.trainer import Callback

from .nvfp4_linear import nvfp4_linear
from .recipe import (FP4_LINEARS, fp4_active, plan_for, scaled_bf16_layers, sr_seed,
                     switch_iteration)
from .stats import QUANT_STATS
from .te_gemm import fp4_gemm_support, resolve_gemm

_BLOCK = 16
# The layer attribute that holds a kind's linears (megatron's layer classes fix these slots).
_ROLE_OWNER = {"mamba": "mixer", "attention": "self_attention", "mlp": "mlp"}


# ---------------------------------------------------------------------------------------------
# The plan: per (block index, role), a pure function of the config
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LinearPlan:
    layer: int              # global block index (0-based)
    kind: str               # mamba | attention | mlp
    role: str               # spec slot, e.g. "in_proj"
    fp4: bool               # NVFP4 while the recipe is active
    reason: str
    local_shape: Tuple[int, int]   # this TP shard's weight [N, K]


def local_linear_shapes(cfg: RunConfig) -> Dict[str, Dict[str, Tuple[int, int]]]:
    """Per kind and role, one TP shard's weight shape [out, in] (column: out split; row: in)."""
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    kv = m.kv_channels or m.hidden_size // m.num_attention_heads
    d_inner = m.mamba_num_heads * m.mamba_head_dim
    in_proj_rows = 2 * d_inner + 2 * m.mamba_num_groups * m.mamba_state_dim + m.mamba_num_heads
    return {
        "mamba": {"in_proj": (in_proj_rows // tp, m.hidden_size),
                  "out_proj": (m.hidden_size, d_inner // tp)},
        "attention": {"linear_qkv": ((m.num_attention_heads + 2 * m.num_query_groups) * kv // tp,
                                     m.hidden_size),
                      "linear_proj": (m.hidden_size, m.num_attention_heads * kv // tp)},
        "mlp": {"linear_fc1": (m.ffn_hidden_size // tp, m.hidden_size),
                "linear_fc2": (m.hidden_size, m.ffn_hidden_size // tp)},
    }


def linear_plan(cfg: RunConfig) -> Dict[Tuple[int, str], LinearPlan]:
    """(block index, role) -> LinearPlan for every linear of every block."""
    recipe: NVFP4Recipe = cfg.fp4
    m = cfg.model
    shapes = local_linear_shapes(cfg)
    tp = cfg.parallel.tensor_model_parallel_size
    out = {}
    for block in plan_for(recipe, m.num_layers, m.hybrid_override_pattern):
        for role in FP4_LINEARS[block.kind]:
            n, k = shapes[block.kind][role]
            fp4, reason = block.precision == "nvfp4", block.reason
            if fp4 and (n % _BLOCK or k % _BLOCK):
                fp4 = False
                reason = (f"weight [{n}, {k}]{' per TP rank' if tp > 1 else ''} not a "
                          f"multiple of {_BLOCK}")
            out[(block.index, role)] = LinearPlan(block.index, block.kind, role, fp4, reason,
                                                  (n, k))
    return out


def format_linear_plan(cfg: RunConfig, plan: Dict[Tuple[int, str], LinearPlan],
                       gemm: Optional[Tuple[str, str]] = None) -> str:
    """The start-up table: one line per block (index, kind, precision, NVFP4 linears, reason),
    then a summary; ``gemm`` is ``resolve_gemm``'s (backend, reason) for the GEMM line."""
    recipe: NVFP4Recipe = cfg.fp4
    dtype = "bf16" if cfg.training.bf16 else "fp32"
    lines = ["NVFP4 precision plan (--fp4 nvfp4):",
             "block  kind       precision  nvfp4 linears            reason",
             "-----  ---------  ---------  -----------------------  ------------------------"]
    n_blocks = n_lin = n_all = 0
    for block in plan_for(recipe, cfg.model.num_layers, cfg.model.hybrid_override_pattern):
        entries = [plan[(block.index, role)] for role in FP4_LINEARS[block.kind]]
        fp4 = [e.role for e in entries if e.fp4]
        n_blocks, n_lin, n_all = n_blocks + bool(fp4), n_lin + len(fp4), n_all + len(entries)
        reason = block.reason
        for e in entries:   # linears of an NVFP4 block kept out of FP4, each with its reason
            if block.precision == "nvfp4" and not e.fp4:
                reason += f"; {e.role} kept {dtype}: {e.reason}"
        lines.append(f"{block.index:5d}  {block.kind:<9}  {'nvfp4' if fp4 else dtype:<9}  "
                     f"{','.join(fp4) or '-':<23}  {reason}")
    summary = (f"NVFP4 blocks: {n_blocks}/{cfg.model.num_layers}, linears: {n_lin}/{n_all}; "
               f"rht={recipe.use_rht} sr={recipe.use_sr} 2d_weights={recipe.use_2d_weights}; "
               f"embedding, output layer, norms, attention core, Mamba conv/SSM: {dtype}")
    it = switch_iteration(cfg.training.train_iters, recipe.fp4_switch_to_bf16_at)
    if it is not None:
        summary += f"; all {dtype} from iteration {it} of {cfg.training.train_iters}"
    lines.append(summary)
    if gemm is not None:
        backend, why = gemm
        where = ("TransformerEngine FP4 tensor cores" if backend == "te"
                 else "emulated (fp32 matmul of dequantized operands)")
        lines.append(f"NVFP4 GEMMs: {where} ({why})")
    return "\n".join(lines)


def check_plan(cfg: RunConfig, plan: Dict[Tuple[int, str], LinearPlan]) -> None:
    """--fp4 nvfp4 that quantizes nothing is a mistake in the flags, not a silent BF16 run."""
    if any(p.fp4 for p in plan.values()):
        return
    r, n = cfg.fp4, cfg.model.num_layers
    first, last = scaled_bf16_layers(n)
    if r.fp4_bf16_first_layers + r.fp4_bf16_last_layers >= n:
        raise ValueError(
            f"--fp4-bf16-first-layers={r.fp4_bf16_first_layers} + --fp4-bf16-last-layers="
            f"{r.fp4_bf16_last_layers}: keep all {n} blocks in BF16, so --fp4 nvfp4 would "
            f"quantize nothing; pass smaller values (the 12B recipe scaled to {n} blocks is "
            f"--fp4-bf16-first-layers {first} --fp4-bf16-last-layers {last})")
    raise ValueError(
        "--fp4 nvfp4: no linear layer of the middle blocks has a per-TP-rank weight whose "
        f"dimensions are multiples of {_BLOCK}; change the widths (--hidden-size, "
        "--ffn-hidden-size, heads) or drop --fp4")


# ---------------------------------------------------------------------------------------------
# The linears: megatron's TP linears whose local GEMM can run in NVFP4
# ---------------------------------------------------------------------------------------------

class RecipeState:
    """Shared by every NVFP4 linear of one model: the recipe and its plan, whether NVFP4 is on
    this iteration, and what the stochastic-rounding seeds are drawn from."""

    def __init__(self, recipe: NVFP4Recipe, plan: Dict[Tuple[int, str], LinearPlan], seed: int,
                 train_iters: int, dp_rank: int = 0, dp_size: int = 1,
                 gemm: Tuple[str, str] = ("emulated", ""), iteration: int = 0):
        self.recipe = recipe
        self.plan = plan
        self.seed = seed
        self.train_iters = train_iters
        self.gemm, self.gemm_reason = gemm   # "emulated" | "te", and why (resolved once per run)
        # Micro-batch j of DP rank r is global micro-batch j * dp_size + r (the trainer's sample
        # layout), so DP ranks draw independent SR noise and DP=2 draws what DP=1 would.
        self.dp_rank, self.dp_size = dp_rank, dp_size
        # Forward calls of each linear in the running iteration: its micro-batch index.
        self._calls: collections.Counter = collections.Counter()
        self.start_iteration(iteration)

    def start_iteration(self, iteration: int) -> None:
        """NVFP4 on or off for `iteration`, the 0-based index of the running one (the BF16
        switch is a pure function of it)."""
        self.iteration = iteration
        self.active = fp4_active(self.recipe, iteration, self.train_iters)
        self._calls.clear()

    def next_sr_seed(self, entry: LinearPlan, tp_rank: int) -> int:
        """The SR seed of this forward of linear `entry`: its iteration, block, role, global
        micro-batch and TP rank, so a resumed run draws what the uninterrupted run drew."""
        local = self._calls[(entry.layer, entry.role)]
        self._calls[(entry.layer, entry.role)] += 1
        return sr_seed(self.seed, self.iteration, entry.layer, entry.role,
                       microbatch=local * self.dp_size + self.dp_rank, tp_rank=tp_rank)

    @property
    def converted(self) -> List[LinearPlan]:
        """The plan entries of the linears that run NVFP4 while the recipe is on."""
        return [entry for entry in self.plan.values() if entry.fp4]


class _NVFP4LinearMixin:
    """Overrides only ``_forward_impl``, the local-GEMM seam of megatron's TP linears: the
    parent's ``forward`` keeps its comms (column: output gather; row: input scatter, output
    all-reduce / SP reduce-scatter). What megatron does *inside* its GEMM function is redone
    here around ``nvfp4_linear``: the SP all-gather of the input (backward reduce-scatter) and
    the async dgrad all-reduce (as an autograd copy-to-TP-region).

    ``apply_nvfp4`` sets the class of a built linear to one of the two below and gives it its
    plan entry and the model's shared ``RecipeState``."""

    nvfp4_plan: LinearPlan
    nvfp4_state: RecipeState

    def _forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False,
                      allreduce_dgrad=False, sequence_parallel=False, tp_group=None, **kwargs):
        if not self.nvfp4_state.active:
            return super()._forward_impl(
                input=input, weight=weight, bias=bias,
                gradient_accumulation_fusion=gradient_accumulation_fusion,
                allreduce_dgrad=allreduce_dgrad, sequence_parallel=sequence_parallel,
                tp_group=tp_group, **kwargs)
        if sequence_parallel:
            input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True,
                                                         group=tp_group)
        elif allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        state = self.nvfp4_state
        group = self.tp_group if self.tp_group is not None and self.tp_group.size() > 1 else None
        seed = state.next_sr_seed(self.nvfp4_plan, self.tp_group.rank() if group is not None else 0)
        return nvfp4_linear(input, weight, bias, recipe=state.recipe, sr_seed=seed,
                            amax_reduce_group=group, gemm=state.gemm)


class NVFP4ColumnParallelLinear(_NVFP4LinearMixin, ColumnParallelLinear):
    """megatron ColumnParallelLinear whose local GEMM runs in NVFP4 while the recipe is on."""


class NVFP4RowParallelLinear(_NVFP4LinearMixin, RowParallelLinear):
    """megatron RowParallelLinear whose local GEMM runs in NVFP4 while the recipe is on."""


_NVFP4_CLASS = {ColumnParallelLinear: NVFP4ColumnParallelLinear,
                RowParallelLinear: NVFP4RowParallelLinear}
NVFP4_LINEAR_TYPES = tuple(_NVFP4_CLASS.values())


# ---------------------------------------------------------------------------------------------
# Applying the recipe to a built model
# ---------------------------------------------------------------------------------------------

def checked_linear_plan(cfg: RunConfig) -> Dict[Tuple[int, str], LinearPlan]:
    """``linear_plan`` of a run, refused when it would quantize nothing."""
    plan = linear_plan(cfg)
    check_plan(cfg, plan)
    return plan


def apply_nvfp4(model_chunks: list, cfg: RunConfig, iteration: int = 0) -> Optional[RecipeState]:
    """Plan the recipe once and convert this rank's planned linears in place, right after the
    model is built (before DDP wraps it): each becomes the NVFP4 subclass of its megatron class,
    weights and checkpoint keys unchanged. Returns the shared state, on or off as ``fp4_active``
    says for ``iteration``, also kept as ``nvfp4_state`` on each chunk's MambaModel; None (and
    nothing changed) without --fp4 nvfp4. Raises before converting anything when the plan would
    quantize nothing or ``--fp4-gemm te`` cannot run here."""
    if not cfg.fp4.enabled:
        return None
    from megatron.core import parallel_state

    plan = checked_linear_plan(cfg)
    state = RecipeState(cfg.fp4, plan, cfg.training.seed, cfg.training.train_iters,
                        parallel_state.get_data_parallel_rank(),
                        parallel_state.get_data_parallel_world_size(),
                        gemm=resolve_gemm(cfg.fp4.fp4_gemm,
                                          fp4_gemm_support(cfg.training.bf16, cfg.fp4.use_rht)),
                        iteration=iteration)
    pattern = cfg.model.hybrid_override_pattern
    for chunk in model_chunks:
        model = unwrap_model(chunk)
        for layer in model.decoder.layers:
            index = layer.layer_number - 1
            kind = LAYER_SYMBOLS[pattern[index]]
            owner = getattr(layer, _ROLE_OWNER[kind])
            for role in FP4_LINEARS[kind]:
                entry = plan[(index, role)]
                if entry.fp4:
                    _convert(getattr(owner, role), entry, state)
        model.nvfp4_state = state
    return state


def _convert(linear, entry: LinearPlan, state: RecipeState) -> None:
    plain = type(linear)
    if plain not in _NVFP4_CLASS:
        raise TypeError(f"block {entry.layer} {entry.role}: --fp4 nvfp4 converts megatron's "
                        f"ColumnParallelLinear / RowParallelLinear, not {plain.__name__}")
    if tuple(linear.weight.shape) != entry.local_shape:
        raise AssertionError(f"block {entry.layer} {entry.role}: weight "
                             f"{tuple(linear.weight.shape)}, planned {entry.local_shape}")
    linear.__class__ = _NVFP4_CLASS[plain]
    linear.nvfp4_plan, linear.nvfp4_state = entry, state


def nvfp4_state(model_chunks: list) -> Optional[RecipeState]:
    """The state ``apply_nvfp4`` gave these chunks, or None."""
    return getattr(unwrap_model(model_chunks[0]), "nvfp4_state", None) if model_chunks else None


# ---------------------------------------------------------------------------------------------
# Trainer wiring (megatron_rlp/extensions.py)
# ---------------------------------------------------------------------------------------------

class NVFP4Callback(Callback):
    """Prints the plan and drives the model's ``RecipeState`` per iteration.

    The BF16 switch is ``fp4_active(recipe, iteration, train_iters)``, a pure function of the
    iteration: a run resumed past the switch point starts in BF16 with no checkpointed state."""

    def __init__(self, cfg: RunConfig, state: RecipeState):
        self.cfg = cfg
        self.state = state
        self._gemms_at_start = 0

    # Callback protocol (megatron_rlp.training.trainer.Callback)
    def on_train_start(self, trainer) -> None:
        _say(format_linear_plan(self.cfg, self.state.plan,
                                (self.state.gemm, self.state.gemm_reason)))
        self._set_iteration(trainer.iteration, starting=True)

    def on_iteration_start(self, trainer, iteration: int) -> None:
        self._set_iteration(iteration)

    def metrics(self, trainer) -> dict:
        return {"fp4_active": self.state.active,
                "nvfp4_gemms": sum(QUANT_STATS.values()) - self._gemms_at_start}

    def _set_iteration(self, iteration: int, starting: bool = False) -> None:
        t = self.cfg.training
        was = self.state.active
        self.state.start_iteration(iteration)
        self._gemms_at_start = sum(QUANT_STATS.values())
        dtype = "BF16" if t.bf16 else "FP32"
        switch = switch_iteration(t.train_iters, self.state.recipe.fp4_switch_to_bf16_at)
        if starting and not self.state.active:
            _say(f"NVFP4: starting at iteration {iteration}, at or past the switch point "
                 f"(iteration {switch}): all blocks {dtype}")
        elif was and not self.state.active:
            _say(f"NVFP4: switching all blocks to {dtype} at iteration {iteration} "
                 f"(--fp4-switch-to-bf16-at {self.state.recipe.fp4_switch_to_bf16_at} of "
                 f"{t.train_iters} iterations)")


def _say(text: str) -> None:
    if is_rank_zero():
        print(text, flush=True)


def nvfp4_callbacks(cfg: RunConfig, model_chunks: list, tokenizer, train_source) -> list:
    """The plan printer and per-iteration driver, when ``apply_nvfp4`` converted the model."""
    state = nvfp4_state(model_chunks)
    return [NVFP4Callback(cfg, state)] if state is not None else []


def dry_run_report(cfg: RunConfig) -> Optional[str]:
    """The per-block plan at the planned TP size, checked as a run would."""
    if not cfg.fp4.enabled:
        return None
    return (format_linear_plan(cfg, checked_linear_plan(cfg)) + "\nNVFP4 GEMMs: chosen at "
            f"start-up on the GPU (--fp4-gemm {cfg.fp4.fp4_gemm}: TransformerEngine on Blackwell "
            "with TE >= 2.14, else emulated)")
