"""Tensor-parallel layout, initialisation and checkpoint splitting of the Mamba2 mixer's parameters.

Every component of `in_proj` (z, x, B, C, dt) and of `conv1d` (x, B, C) is split evenly across TP
ranks and a rank holds its slice of each, so full tensors are drawn once (seeded by seed, global
layer and component) and sliced: initialisation is identical for every TP/PP layout.
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
    default_init = functools.partial(nn.init.normal_, mean=0.0, std=0.02)
    init_method = init_method or default_init
    output_layer_init_method = output_layer_init_method or default_init

    def gen(component):
        return torch.Generator().manual_seed(_component_seed(seed, layer_number, component))

    conv_dim = sum(sizes.conv_sections())
    in_proj = with_cpu_seed(_component_seed(seed, layer_number, "in_proj"), init_method,
                             torch.empty(sum(sizes.in_proj_sections()), d_model))
    out_proj = with_cpu_seed(_component_seed(seed, layer_number, "out_proj"),
                              output_layer_init_method, torch.empty(d_model, sizes.d_inner))
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
    """Slice ``init_full_parameters``' output (or any full state dict of one mixer) for a rank."""
    heads = [sizes.nheads]
    return {
        "in_proj.weight": full_to_local_in_proj(full["in_proj.weight"], tp_rank, tp_size, sizes),
        "out_proj.weight": full_to_local(full["out_proj.weight"], tp_rank, tp_size, [sizes.d_inner], dim=1),
        "conv1d.weight": full_to_local_conv(full["conv1d.weight"], tp_rank, tp_size, sizes),
        "conv1d.bias": full_to_local_conv(full["conv1d.bias"], tp_rank, tp_size, sizes),
        "dt_bias": full_to_local(full["dt_bias"], tp_rank, tp_size, heads),
        "A_log": full_to_local(full["A_log"], tp_rank, tp_size, heads),
        "D": full_to_local(full["D"], tp_rank, tp_size, heads),
        "norm.weight": full_to_local(full["norm.weight"], tp_rank, tp_size, [sizes.d_inner]),
    }


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
