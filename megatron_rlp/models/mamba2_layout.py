"""Tensor-parallel layout, initialisation and checkpoint splitting of the Mamba2 mixer's parameters.

Every component of `in_proj` (z, x, B, C, dt) and of `conv1d` (x, B, C) is split evenly across TP
ranks and a rank holds its slice of each. Init is defined as full tensors drawn once (seeded by
seed, global layer and component) and sliced, so it is identical for every TP/PP layout; a rank
draws only its own elements of them, bit-identically, where torch's generator stream allows it
(`draw_slice`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn

from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

DEFAULT_INIT_SEED = 1234


# ----------------------------------------------------------------------------------------------
# TP layout: every component is split evenly across ranks; a rank holds its slice of each
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mamba2Sizes:
    """Global (TP=1) sizes of one mixer."""

    nheads: int
    head_dim: int
    ngroups: int
    d_state: int

    @property
    def d_inner(self) -> int:
        return self.nheads * self.head_dim

    def in_proj_sections(self) -> List[int]:
        """Rows of the full in_proj weight: z | x | B | C | dt."""
        gn = self.ngroups * self.d_state
        return [self.d_inner, self.d_inner, gn, gn, self.nheads]

    def conv_sections(self) -> List[int]:
        """Channels of the full conv1d: x | B | C."""
        gn = self.ngroups * self.d_state
        return [self.d_inner, gn, gn]


def full_to_local(
    tensor: torch.Tensor, tp_rank: int, tp_size: int, sections: Sequence[int], dim: int = 0
) -> torch.Tensor:
    """Rank ``tp_rank``'s slice: each full section split in ``tp_size`` equal pieces, concatenated."""
    pieces = []
    for part in torch.split(tensor, list(sections), dim=dim):
        pieces.append(torch.chunk(part, tp_size, dim=dim)[tp_rank])
    return torch.cat(pieces, dim=dim)


def local_to_full(shards: Sequence[torch.Tensor], sections: Sequence[int], dim: int = 0) -> torch.Tensor:
    """Inverse of ``full_to_local`` given all ranks' slices in rank order (merge per component,
    never by concatenating rank shards)."""
    tp_size = len(shards)
    local_sections = [s // tp_size for s in sections]
    per_rank = [torch.split(t, local_sections, dim=dim) for t in shards]
    return torch.cat([per_rank[r][i] for i in range(len(sections)) for r in range(tp_size)], dim=dim)


def full_to_local_in_proj(weight, tp_rank: int, tp_size: int, sizes: Mamba2Sizes) -> torch.Tensor:
    return full_to_local(weight, tp_rank, tp_size, sizes.in_proj_sections())


def local_to_full_in_proj(shards, sizes: Mamba2Sizes) -> torch.Tensor:
    return local_to_full(shards, sizes.in_proj_sections())


def full_to_local_conv(tensor, tp_rank: int, tp_size: int, sizes: Mamba2Sizes) -> torch.Tensor:
    return full_to_local(tensor, tp_rank, tp_size, sizes.conv_sections())


def local_to_full_conv(shards, sizes: Mamba2Sizes) -> torch.Tensor:
    return local_to_full(shards, sizes.conv_sections())


# ----------------------------------------------------------------------------------------------
# Initialisation: full tensors from generators seeded by (seed, global layer, component)
# ----------------------------------------------------------------------------------------------

_COMPONENTS = ("in_proj", "out_proj", "conv_weight", "conv_bias", "dt", "A")


def _component_seed(seed: int, layer_number: int, component: str) -> int:
    """Independent stream per (run seed, global layer, component): init depends on neither the
    TP size nor the PP stage nor what was drawn before."""
    return (int(seed) * 1_000_003 + int(layer_number) * 1_009 + _COMPONENTS.index(component)) % (2**62)


def run_init_seed(config) -> int:
    """The run's seed attached by the model builder as ``config.init_seed``, else 1234."""
    seed = getattr(config, "init_seed", None)
    return DEFAULT_INIT_SEED if seed is None else int(seed)


def init_weights_requested(config) -> bool:
    """Whether our seeded init runs: ``config.init_weights`` as attached by the model builder,
    else megatron's ``perform_initialization`` (configs built elsewhere, e.g. in tests).

    The builder keeps ``perform_initialization`` off so megatron never draws the weights that
    this init overwrites; ``init_weights`` is our own switch (off when a checkpoint is loaded
    right after the build)."""
    flag = getattr(config, "init_weights", None)
    return bool(config.perform_initialization if flag is None else flag)


def with_cpu_seed(seed: int, init_fn: Callable[[torch.Tensor], object], tensor: torch.Tensor):
    """Run a megatron ``init_method`` (which draws from the global CPU generator) on ``tensor``
    with the generator temporarily reseeded; the caller's RNG state is restored after."""
    state = torch.get_rng_state()
    try:
        torch.default_generator.manual_seed(seed)
        init_fn(tensor)
    finally:
        torch.set_rng_state(state)
    return tensor


# Drawing part of a tensor. torch's CPU `normal_` on a contiguous fp32 tensor of n >= 16 elements
# first fills all n with uniforms, one 32-bit draw of the generator each, then maps each aligned
# block of 16 through Box-Muller (and redraws the last 16 if n % 16 != 0). So elements [a, b) of a
# full draw equal a draw of b - a elements after skipping a draws, whenever a, b and n are
# multiples of 16. A rank therefore draws only its own elements, row by row for a dim-1 split,
# and skips the others' at the price of 32-bit integers (~half the cost of a normal, measured),
# never holding the full tensor (whose page faults alone can cost more than the draw).
# `_direct_draws_are_exact` checks this property of the installed torch once; if it fails
# (another torch), or for another init method, the full tensor is drawn and sliced.

PARTIAL_DRAWS = True
"""Set False to always draw full tensors and slice them (benchmarks/init_12b_rank.py compares)."""

_SKIP_BLOCK = 1 << 22


def _skip_draws(count: int, buf: torch.Tensor) -> None:
    """Advance the global CPU generator by ``count`` 32-bit draws (as ``count`` fp32 uniforms
    would): uint8 ``random_`` takes one draw per element and is the cheapest way to spend them."""
    while count > 0:
        n = min(count, buf.numel())
        buf[:n].random_()
        count -= n


def _segments(full_shape, row_ranges, cols):
    """The wanted elements as [start, stop) ranges of the flattened full tensor, in order."""
    row_elems = math.prod(full_shape[1:])
    if cols is None:
        return [(start * row_elems, stop * row_elems) for start, stop in row_ranges]
    width = full_shape[1]
    return [(row * width + cols[0], row * width + cols[1])
            for start, stop in row_ranges for row in range(start, stop)]


def _draw_directly(seed, init_fn, full_shape, row_ranges, cols) -> torch.Tensor:
    rows = sum(stop - start for start, stop in row_ranges)
    shape = (rows, *full_shape[1:]) if cols is None else (rows, cols[1] - cols[0])
    out = torch.empty(shape, dtype=torch.float32)
    flat = out.view(-1)
    skip = None
    state = torch.get_rng_state()
    try:
        torch.default_generator.manual_seed(seed)
        at = drawn = 0
        for start, stop in _segments(full_shape, row_ranges, cols):
            if start > drawn:
                if skip is None:
                    skip = torch.empty(_SKIP_BLOCK, dtype=torch.uint8)
                _skip_draws(start - drawn, skip)
            init_fn(flat[at:at + stop - start])
            at, drawn = at + stop - start, stop
    finally:
        torch.set_rng_state(state)
    return out


def _draw_full(seed, init_fn, full_shape, row_ranges, cols) -> torch.Tensor:
    full = with_cpu_seed(seed, init_fn, torch.empty(full_shape, dtype=torch.float32))
    if not (len(row_ranges) == 1 and tuple(row_ranges[0]) == (0, full_shape[0])):
        full = torch.cat([full[start:stop] for start, stop in row_ranges])
    return full if cols is None else full[:, cols[0]:cols[1]].contiguous()


@functools.lru_cache(maxsize=None)
def _direct_draws_are_exact() -> bool:
    """Does this torch's CPU normal_ stream have the prefix property described above?"""
    init = functools.partial(nn.init.normal_, mean=0.0, std=1.0)
    shape, ranges = (40, 48), [(4, 9), (20, 31)]
    return all(torch.equal(_draw_directly(11, init, shape, ranges, cols),
                           _draw_full(11, init, shape, ranges, cols))
               for cols in (None, (16, 32)))


def _is_plain_normal(init_fn) -> bool:
    return (isinstance(init_fn, functools.partial) and init_fn.func is nn.init.normal_
            and not init_fn.args and set(init_fn.keywords) <= {"mean", "std"})


def draw_slice(seed: int, init_fn: Callable, full_shape: Sequence[int],
              row_ranges: Sequence[Sequence[int]], cols: Optional[Sequence[int]] = None
              ) -> torch.Tensor:
    """Rows ``[start, stop)`` for each range (increasing, disjoint), and of a 2-D tensor only the
    columns ``cols = (first, stop)`` if given, of the fp32 tensor
    ``with_cpu_seed(seed, init_fn, torch.empty(full_shape))``, rows concatenated along dim 0.

    Bit-identical to drawing the full tensor; draws only the wanted elements (skipping the rest
    of the stream) and never holds the full tensor when ``init_fn`` is a plain
    ``nn.init.normal_`` (megatron's ``init_method_normal``) and every boundary falls on a
    multiple of 16 elements of the flattened tensor."""
    full_shape = tuple(int(d) for d in full_shape)
    row_elems, total = math.prod(full_shape[1:]), math.prod(full_shape)
    bounds = [int(b) for r in row_ranges for b in r]
    if cols is not None:
        if len(full_shape) != 2 or not 0 <= cols[0] < cols[1] <= full_shape[1]:
            raise ValueError(f"cols={tuple(cols)} must be a column range of a 2-D shape, "
                             f"got shape {full_shape}")
        cols = (int(cols[0]), int(cols[1]))
    if bounds != sorted(bounds) or bounds[0] < 0 or bounds[-1] > full_shape[0] or any(
            start >= stop for start, stop in row_ranges):
        raise ValueError(f"row_ranges={list(row_ranges)} must be increasing, disjoint, non-empty "
                         f"ranges of the {full_shape[0]} rows")
    if cols == (0, full_shape[-1]):
        cols = None
    aligned = (all(b * row_elems % 16 == 0 for b in bounds) if cols is None
               else full_shape[1] % 16 == 0 and cols[0] % 16 == 0 and cols[1] % 16 == 0)
    direct = PARTIAL_DRAWS and _is_plain_normal(init_fn) and total % 16 == 0 and aligned
    if direct and _direct_draws_are_exact():
        return _draw_directly(seed, init_fn, full_shape, row_ranges, cols)
    return _draw_full(seed, init_fn, full_shape, row_ranges, cols)


def init_full_parameters(
    sizes: Mamba2Sizes, d_model: int, *, d_conv: int = 4, seed: int = DEFAULT_INIT_SEED,
    layer_number: int = 1, init_method: Optional[Callable] = None,
    output_layer_init_method: Optional[Callable] = None, conv_init: Optional[float] = None,
    A_init_range=(1, 16), dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
) -> dict:
    """The full (TP=1) fp32 tensors of one mixer; each rank copies its slice.

    Distributions follow megatron's MambaMixer: in_proj/out_proj by the config's init methods,
    conv weight kaiming_uniform(a=sqrt 5) (= U(-1/sqrt(d_conv), 1/sqrt(d_conv))) or
    U(-conv_init, conv_init), conv bias nn.Conv1d's default U(-1/sqrt(d_conv), ...), dt log-uniform
    in [dt_min, dt_max] clamped at dt_init_floor with dt_bias = softplus^-1(dt), A ~ U(A_init_range).
    """
    return _init_parameters(
        sizes, d_model, [(0, sum(sizes.in_proj_sections()))], d_conv=d_conv, seed=seed,
        layer_number=layer_number, init_method=init_method,
        output_layer_init_method=output_layer_init_method, conv_init=conv_init,
        A_init_range=A_init_range, dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor)


def init_local_parameters(sizes: Mamba2Sizes, d_model: int, tp_rank: int, tp_size: int,
                          **init_kwargs) -> dict:
    """``local_parameters(init_full_parameters(sizes, d_model, **init_kwargs), tp_rank, tp_size,
    sizes)`` bit for bit, drawing only this rank's rows of in_proj (the mixer's largest tensor:
    one slice per component) and keeping only its columns of out_proj (see `draw_slice`)."""
    rows, start = [], 0
    for size in sizes.in_proj_sections():
        per_rank = size // tp_size
        rows.append((start + tp_rank * per_rank, start + (tp_rank + 1) * per_rank))
        start += size
    per_rank = sizes.d_inner // tp_size
    cols = (tp_rank * per_rank, (tp_rank + 1) * per_rank)
    full = _init_parameters(sizes, d_model, rows, out_proj_cols=cols, **init_kwargs)
    local = {name: full.pop(name) for name in ("in_proj.weight", "out_proj.weight")}  # sliced
    return {**local, **local_parameters(full, tp_rank, tp_size, sizes)}


def _init_parameters(
    sizes: Mamba2Sizes, d_model: int, in_proj_rows, *, out_proj_cols=None, d_conv: int = 4,
    seed: int = DEFAULT_INIT_SEED, layer_number: int = 1, init_method: Optional[Callable] = None,
    output_layer_init_method: Optional[Callable] = None, conv_init: Optional[float] = None,
    A_init_range=(1, 16), dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
) -> dict:
    """`init_full_parameters`, with ``in_proj.weight`` holding only the rows ``in_proj_rows`` and
    ``out_proj.weight`` only the columns ``out_proj_cols`` (None: all)."""
    default_init = functools.partial(nn.init.normal_, mean=0.0, std=0.02)
    init_method = init_method or default_init
    output_layer_init_method = output_layer_init_method or default_init

    def gen(component):
        return torch.Generator().manual_seed(_component_seed(seed, layer_number, component))

    conv_dim = sum(sizes.conv_sections())
    in_proj = draw_slice(_component_seed(seed, layer_number, "in_proj"), init_method,
                        (sum(sizes.in_proj_sections()), d_model), in_proj_rows)
    out_proj = draw_slice(_component_seed(seed, layer_number, "out_proj"), output_layer_init_method,
                         (d_model, sizes.d_inner), [(0, d_model)], cols=out_proj_cols)
    bound = conv_init if conv_init is not None else 1.0 / math.sqrt(d_conv)
    conv_weight = torch.empty(conv_dim, 1, d_conv).uniform_(-bound, bound, generator=gen("conv_weight"))
    bias_bound = 1.0 / math.sqrt(d_conv)
    conv_bias = torch.empty(conv_dim).uniform_(-bias_bound, bias_bound, generator=gen("conv_bias"))
    u = torch.rand(sizes.nheads, generator=gen("dt"))
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
    dt_bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    A = torch.empty(sizes.nheads).uniform_(A_init_range[0], A_init_range[1], generator=gen("A"))
    return {
        "in_proj.weight": in_proj, "out_proj.weight": out_proj, "conv1d.weight": conv_weight,
        "conv1d.bias": conv_bias, "dt_bias": dt_bias, "A_log": torch.log(A),
        "D": torch.ones(sizes.nheads), "norm.weight": torch.ones(sizes.d_inner),
    }


def local_parameters(full: dict, tp_rank: int, tp_size: int, sizes: Mamba2Sizes) -> dict:
    """Slice ``init_full_parameters``' output (or any full state dict of one mixer, or part of
    one) for a rank."""
    heads = [sizes.nheads]
    slicers = {
        "in_proj.weight": lambda t: full_to_local_in_proj(t, tp_rank, tp_size, sizes),
        "out_proj.weight": lambda t: full_to_local(t, tp_rank, tp_size, [sizes.d_inner], dim=1),
        "conv1d.weight": lambda t: full_to_local_conv(t, tp_rank, tp_size, sizes),
        "conv1d.bias": lambda t: full_to_local_conv(t, tp_rank, tp_size, sizes),
        "dt_bias": lambda t: full_to_local(t, tp_rank, tp_size, heads),
        "A_log": lambda t: full_to_local(t, tp_rank, tp_size, heads),
        "D": lambda t: full_to_local(t, tp_rank, tp_size, heads),
        "norm.weight": lambda t: full_to_local(t, tp_rank, tp_size, [sizes.d_inner]),
    }
    return {name: slicers[name](tensor) for name, tensor in full.items()}


# ----------------------------------------------------------------------------------------------
# Checkpoint: split in_proj / conv1d into per-component ShardedTensors (as megatron does)
# ----------------------------------------------------------------------------------------------


def split_sharded_tensor(
    sh_ten: ShardedTensor, sections: List[int], names: List[str], dim: int = 0
) -> ShardedTensorFactory:
    """A factory saving ``sh_ten`` as independent keys ``<key>.<name>``, one per local section.

    Each piece is a ShardedTensor narrowed from the TP-sharded original, so its global shape is
    the full component (e.g. ``in_proj.weight.z [d_inner, d_model]``) and checkpoints reshard
    across TP sizes and match megatron's MambaMixer keys.
    """
    if sum(sections) != sh_ten.local_shape[dim]:
        raise ValueError(
            f"split sections {sections} must cover dim {dim} of {sh_ten.key} "
            f"(local size {sh_ten.local_shape[dim]})"
        )
    template = sh_ten.without_data()

    @torch.no_grad()
    def build(key, t, replica_id, flattened_range):
        whole = replace(template, key=key, data=t, dtype=t.dtype, replica_id=replica_id,
                        flattened_range=flattened_range)
        pieces, start = [], 0
        for size, name in zip(sections, names):
            for piece in whole.narrow(dim, start, size):
                piece.key = f"{piece.key}.{name}"
                pieces.append(piece)
            start += size
        return pieces

    @torch.no_grad()
    def merge(sub_state_dict):
        return torch.cat(sub_state_dict)

    return ShardedTensorFactory(sh_ten.key, sh_ten.data, build, merge, sh_ten.replica_id)
