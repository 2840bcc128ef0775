"""Pure-torch Mamba2 mixer: a drop-in for megatron-core's ``MambaMixer`` that runs on a CPU.

Data flow of one mixer (Mamba2 paper, Dao & Gu 2024, "SSD"):

    zxBCdt = in_proj(u)                                  rows per TP rank: [z_r | x_r | B_r | C_r | dt_r]
    xBC    = silu(causal_depthwise_conv1d(xBC))          channels [x_r | B_r | C_r]
    dt     = softplus(dt + dt_bias);  A = -exp(A_log)
    h_t    = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T        (per head; B_t, C_t shared by a group of heads)
    y_t    = h_t C_t + D x_t
    y      = rmsnorm_grouped(y * silu(z)) * norm.weight  (gate BEFORE normalising: mamba_ssm's
                                                          norm_before_gate=False, megatron's default)
    out    = out_proj(y)

Shape legend: b batch, l/s sequence positions, h heads, p head_dim, g groups, n state_dim, c chunks,
T chunk length, conv_dim = d_inner + 2 g n (local to the TP rank unless said otherwise).

Public API (scan, conv and norm live in `ssd.py`; TP layout, init and checkpoint split in
`mamba2_layout.py`; the mixer module here)
----------
Scan kernels (fp32 math, inputs ``x [b,l,h,p]``, ``dt [b,l,h]`` already softplus'ed, ``A [h]``
negative, ``B, C [b,l,g,n]``; both return ``(y [b,l,h,p], final_state [b,h,p,n])``):
  - ``ssd_scan_reference(x, dt, A, B, C, D=None, initial_state=None, seq_idx=None)``: the
    sequential recurrence.
  - ``ssd_scan_chunked(x, dt, A, B, C, chunk_size, D=None, initial_state=None, seq_idx=None)``:
    ssd_minimal's chunked state-passing algorithm; pads ``l`` up to a multiple of ``chunk_size``.
    ``seq_idx [b,l]``: document ids of packed sequences (state resets at each new document).
  - ``ssd_step(x, dt, A, B, C, state)`` one recurrence step (``x [b,h,p]`` ...) -> ``(y, state)``.
  - ``ssd_final_state(x, dt, A, B, initial_state=None)`` (here, in mamba2.py): only the final
    state, fp32; used beside the CUDA kernel.
Conv and norm: ``causal_depthwise_conv1d``, ``conv_step``, ``gated_rms_norm``, ``GatedRMSNorm``.
TP layout: ``Mamba2Sizes``, ``full_to_local_in_proj``/``local_to_full_in_proj``,
``full_to_local_conv``/``local_to_full_conv`` and the generic ``full_to_local``/``local_to_full``.
Init: ``init_full_parameters(sizes, d_model, seed=, layer_number=, ...)`` -> the full (TP=1) tensors,
seeded by (``config.init_seed`` or 1234, global layer number) only, so init is identical for every
TP/PP layout; ``local_parameters(full, tp_rank, tp_size, sizes)`` -> one rank's slices.
Checkpoint: ``split_sharded_tensor`` (megatron's per-component split).
Packed documents: ``document_seq_idx``, ``packed_seq_idx``.
Module: ``Mamba2MixerSubmodules(in_proj, out_proj)`` and ``Mamba2Mixer`` with
  - ``forward(hidden_states [s,b,d], inference_context=None, *, packed_seq_params=None)``
    -> ``(out [s,b,d], out_bias or None)`` like MambaMixer (static inference contexts supported;
    ``packed_seq_params`` marks packed documents — `models.packed.PackedDocuments` per row
    (``seq_idx [b, s]``), or megatron's THD ``cu_seqlens_q[_padded]`` — and no conv or SSM state
    crosses a document boundary: ``seq_idx`` in the conv and scan functions, `document_seq_idx`);
  - ``allocate_inference_state(batch, device=None, conv_dtype=None, ssm_dtype=torch.float32)``
    -> ``(conv_state [b, conv_dim, d_conv], ssm_state [b, h_local, p, n])`` zeros;
  - ``forward_with_state(hidden_states [s,b,d], conv_state=None, ssm_state=None, seq_idx=None)``
    -> ``(out [s,b,d], conv_state, ssm_state)``: prefill (or continue from given states);
  - ``step(hidden_states [1,b,d] or [b,d], conv_state, ssm_state)`` -> ``(out, conv_state, ssm_state)``:
    one decoding token. Both inference entry points return NEW state tensors (inputs are not
    modified, so a prefix state can be copied to many continuations) and fold the out_proj bias
    (if any) into ``out``. The conv state holds the last ``d_conv`` raw (pre-conv) xBC inputs,
    newest last, zero-padded, exactly as megatron's MambaMixer stores it.

On CUDA, when ``causal_conv1d`` and ``mamba_ssm`` import, the full-sequence path uses their kernels
(``causal_conv1d_fn``, ``mamba_chunk_scan_combined``; both take ``seq_idx``, the conv in
channel-last layout); everything else is plain torch. The SSM
state handed to a cache is fp32 on every path (the kernel's own final state is bf16 in bf16 runs,
so that path computes it with ``ssd_final_state``), and ``step`` keeps it fp32.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from .mamba2_layout import (
    Mamba2Sizes,
    run_init_seed,
    init_local_parameters,
    init_weights_requested,
    split_sharded_tensor,
)
from .ssd import (
    NORM_EPS,
    GatedRMSNorm,
    causal_depthwise_conv1d,
    conv_state_of,
    conv_step,
    ssd_scan_chunked,
    ssd_step,
)


# ----------------------------------------------------------------------------------------------
# Optional CUDA kernels
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _cuda_kernels():
    """``(causal_conv1d_fn, mamba_chunk_scan_combined)`` when both packages import, else None."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except (ImportError, OSError):
        return None
    return causal_conv1d_fn, mamba_chunk_scan_combined


def ssd_final_state(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    initial_state: Optional[torch.Tensor] = None,
                    seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The SSM state after the last position, in fp32, without the outputs.

    x [b,l,h,p], dt [b,l,h] (softplus'ed), A [h] (negative), B [b,l,g,n], initial_state
    [b,h,p,n] or None -> state [b,h,p,n] fp32 (fp64 for fp64 inputs). Unrolling the recurrence
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T gives

        h_l = exp(sum_{t<=l} dt_t A) h_0 + sum_t exp(sum_{s>t} dt_s A) dt_t x_t B_t^T.

    Used on the CUDA path, whose kernel returns its final state rounded to C's dtype. The decay
    exponents are suffix sums accumulated from the end, so the terms that survive the decay (the
    last positions, small sums) carry no cancellation error from the long prefix.
    ``seq_idx [b, l]`` (packed documents, as in `ssd_scan_chunked`): only the last document's
    positions add to the state (the suffix sums over them stay inside it), and the initial state
    counts only for rows that are one document throughout.
    """
    b, L, h, p = x.shape
    g, n = B.shape[-2:]
    ct = torch.promote_types(x.dtype, torch.float32)
    a = dt.to(ct) * A.to(ct)                                    # [b,l,h] log-decay per step
    suffix = a.flip(1).cumsum(1).flip(1)                        # sum_{s>=t} a_s
    after = F.pad(suffix[:, 1:], (0, 0, 0, 1))                  # sum_{s>t} a_s (0 at the end)
    weight = torch.exp(after) * dt.to(ct)                       # [b,l,h]
    if seq_idx is not None:
        weight = weight * (seq_idx == seq_idx[:, -1:]).to(ct)[..., None]
    xw = (x.to(ct) * weight[..., None]).reshape(b, L, g, h // g, p)
    state = torch.einsum("blgkp,blgn->bgkpn", xw, B.to(ct)).reshape(b, h, p, n)
    if initial_state is not None:
        carried = torch.exp(suffix[:, 0])
        if seq_idx is not None:
            carried = carried * (seq_idx[:, :1] == seq_idx[:, -1:]).to(ct)
        state = state + carried[:, :, None, None] * initial_state.to(ct)
    return state


# ----------------------------------------------------------------------------------------------
# The mixer
# ----------------------------------------------------------------------------------------------


def document_seq_idx(packed_seq_params, length: int, batch: int) -> torch.Tensor:
    """``seq_idx [batch, length]`` (document id per token) for the conv and the scan.

    Our `models.packed.PackedDocuments` carries per-row ids (from `models/packing.document_ids`:
    rows of a micro-batch have their own boundaries); megatron's THD ``PackedSeqParams`` describe
    one stream by ``cu_seqlens``, the same for every row (`packed_seq_idx`). ``length`` is the
    full sequence, also under sequence parallelism (in_proj gathers it before the mixer's math).
    """
    own = getattr(packed_seq_params, "seq_idx", None)
    if own is None:
        return packed_seq_idx(packed_seq_params, length).expand(batch, -1)
    if tuple(own.shape) != (batch, length):
        raise ValueError(f"packed_seq_params.seq_idx has shape {tuple(own.shape)}; the Mamba2 "
                         f"mixer needs [batch, sequence] = [{batch}, {length}] (the whole "
                         f"sequence)")
    return own


def packed_seq_idx(packed_seq_params, total_tokens: int) -> torch.Tensor:
    """Document id per token ``[1, total_tokens]`` from ``cu_seqlens_q_padded`` (or
    ``cu_seqlens_q``), e.g. [0, 5, 7] with 9 tokens -> [0,0,0,0,0,1,1,2,2]; tokens past the last
    boundary form one more document (megatron MambaMixer._create_packed_seq_idx semantics)."""
    cu = packed_seq_params.cu_seqlens_q_padded
    if cu is None:
        cu = packed_seq_params.cu_seqlens_q
    cu = torch.cat([cu.to(torch.long), torch.tensor([total_tokens], device=cu.device)])
    lengths = (cu[1:] - cu[:-1]).clamp(min=0)
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)[None]


@dataclass
class Mamba2MixerSubmodules:
    """Specs of the input (column-parallel) and output (row-parallel) projections."""

    in_proj: Union[ModuleSpec, type] = None
    out_proj: Union[ModuleSpec, type] = None


def _no_init(_weight):
    """The projections are initialised by the mixer (TP/PP-invariant); skip the linear's own."""


def _validate(config, nheads, head_dim, ngroups, d_state, tp_size, chunk_size, d_conv, A_init_range):
    for field, value in (("mamba_num_heads", nheads), ("mamba_head_dim", head_dim),
                         ("mamba_num_groups", ngroups), ("mamba_state_dim", d_state)):
        if value is None or int(value) <= 0:
            flag = "--" + field.replace("_", "-")
            raise ValueError(f"{field}={value!r}: the Mamba2 mixer needs a positive value; set {flag}")
    if nheads % ngroups:
        raise ValueError(
            f"mamba_num_heads={nheads} is not divisible by mamba_num_groups={ngroups}: every group "
            f"of B/C must serve a whole number of heads; choose heads as a multiple of groups")
    if nheads % tp_size:
        raise ValueError(
            f"mamba_num_heads={nheads} is not divisible by tensor_model_parallel_size={tp_size}: "
            f"each TP rank holds whole heads; choose a TP size that divides the heads")
    if ngroups % tp_size:
        raise ValueError(
            f"mamba_num_groups={ngroups} is not divisible by tensor_model_parallel_size={tp_size}: "
            f"each TP rank holds whole groups; choose a TP size that divides the groups")
    if chunk_size <= 0 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size={chunk_size} must be a power of two (e.g. 128)")
    if d_conv < 1:
        raise ValueError(f"d_conv={d_conv} must be >= 1")
    if not (0 < A_init_range[0] <= A_init_range[1]):
        raise ValueError(f"A_init_range={tuple(A_init_range)} must satisfy 0 < low <= high")
    if getattr(config, "context_parallel_size", 1) > 1:
        raise ValueError(
            f"context_parallel_size={config.context_parallel_size}: the torch Mamba2 mixer does not "
            f"support context parallelism; use context_parallel_size=1")


class Mamba2Mixer(MegatronModule):
    """Mamba2 mixer with megatron MambaMixer's parameter names, per-rank shapes and checkpoint keys.

    Built by MambaLayer as ``build_module(submodules.mixer, config, d_model=..., layer_number=...,
    pg_collection=..., pp_layer_offset=...)``. Sizes come from the config (``mamba_num_heads``,
    ``mamba_head_dim``, ``mamba_num_groups``, ``mamba_state_dim``; the scan's chunk length from
    ``mamba_chunk_size`` unless ``chunk_size`` is passed). The init seed is
    ``config.init_seed`` (set by the model builder to the run's --seed) or 1234.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Mamba2MixerSubmodules,
        d_model: int,
        d_conv: Optional[int] = None,
        conv_init: Optional[float] = None,
        A_init_range=(1, 16),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        chunk_size: Optional[int] = None,
        layer_number: Optional[int] = None,
        pg_collection=None,
        pp_layer_offset: int = 0,
        **unused,
    ):
        super().__init__(config)
        self.tp_group = (pg_collection.tp if pg_collection is not None
                         else parallel_state.get_tensor_model_parallel_group())
        tp_size, tp_rank = self.tp_group.size(), self.tp_group.rank()
        nheads, head_dim = config.mamba_num_heads, config.mamba_head_dim
        ngroups, d_state = config.mamba_num_groups, config.mamba_state_dim
        if chunk_size is None:  # MambaLayer passes none: --mamba-chunk-size, set by the builder
            chunk_size = getattr(config, "mamba_chunk_size", 128)
        if d_conv is None:  # likewise --mamba-conv-kernel
            d_conv = getattr(config, "mamba_conv_kernel", 4)
        _validate(config, nheads, head_dim, ngroups, d_state, tp_size, chunk_size, d_conv, A_init_range)

        self.sizes = Mamba2Sizes(nheads=nheads, head_dim=head_dim, ngroups=ngroups, d_state=d_state)
        self.d_model, self.d_conv, self.chunk_size = d_model, d_conv, chunk_size
        self.layer_number, self.pp_layer_offset = layer_number, pp_layer_offset
        self.d_state, self.headdim = d_state, head_dim
        self.d_inner = self.sizes.d_inner
        self.nheads_local_tp = nheads // tp_size
        self.ngroups_local_tp = ngroups // tp_size
        self.d_inner_local_tp = self.nheads_local_tp * head_dim
        self.conv_dim_local = self.d_inner_local_tp + 2 * self.ngroups_local_tp * d_state
        self.use_fast_kernels = True  # set False to force the torch path on CUDA

        # Parameters are created without an explicit device when use_cpu_initialization (so a
        # surrounding `torch.device("meta")` context applies); else on the current CUDA device.
        device = (torch.cuda.current_device()
                  if not config.use_cpu_initialization and torch.cuda.is_available() else None)
        dtype = config.params_dtype

        self.in_proj = build_module(
            submodules.in_proj, d_model, sum(self.sizes.in_proj_sections()), config=config,
            init_method=_no_init, gather_output=False, bias=False, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name="fc1", tp_group=self.tp_group,
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim_local, self.conv_dim_local, kernel_size=d_conv, groups=self.conv_dim_local,
            padding=d_conv - 1, bias=conv_bias, device=device, dtype=dtype,
        )
        self.act = nn.SiLU()
        self.dt_bias = nn.Parameter(torch.empty(self.nheads_local_tp, device=device, dtype=dtype))
        self.A_log = nn.Parameter(torch.empty(self.nheads_local_tp, device=device, dtype=torch.float32))
        self.D = nn.Parameter(torch.ones(self.nheads_local_tp, device=device, dtype=torch.float32))
        self.norm = GatedRMSNorm(self.d_inner_local_tp, self.d_inner_local_tp // self.ngroups_local_tp,
                                 eps=NORM_EPS, dtype=dtype, device=device)
        self.norm.tp_group = self.tp_group
        self.out_proj = build_module(
            submodules.out_proj, self.d_inner, d_model, config=config, init_method=_no_init,
            bias=False, input_is_parallel=True, skip_bias_add=True, is_expert=False,
            tp_comm_buffer_name="fc2", tp_group=self.tp_group,
        )
        for param in (self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.A_log, self.D,
                      self.norm.weight):
            if param is not None:
                set_tensor_model_parallel_attributes(param, True, 0, 1)

        self._initialise(config, tp_rank, tp_size, conv_init=conv_init, A_init_range=A_init_range,
                         dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor)

    @torch.no_grad()
    def _initialise(self, config, tp_rank, tp_size, **dist):
        """Copy this rank's slice of the full, seeded init into the parameters."""
        if self.in_proj.weight.is_meta:
            return
        if not init_weights_requested(config):
            # Loading a checkpoint next: skip the big draws, keep the small params finite.
            self.dt_bias.fill_(math.log(math.expm1(0.01)))
            self.A_log.zero_()
            return
        local = init_local_parameters(
            self.sizes, self.d_model, tp_rank, tp_size, d_conv=self.d_conv,
            seed=run_init_seed(config),
            layer_number=self.layer_number or 1, init_method=config.init_method,
            output_layer_init_method=config.output_layer_init_method, **dist,
        )
        for name, param in self.named_parameters():
            if name in local:
                param.copy_(local[name].to(param.dtype))

    # ------------------------------------------------------------------------------------------
    # Forward paths
    # ------------------------------------------------------------------------------------------

    def forward(self, hidden_states, inference_context=None, *, inference_params=None,
                packed_seq_params=None, **unused):
        """hidden_states [s, b, d_model] (sequence-parallel shard if SP) -> (out, out_bias)."""
        if inference_context is None:
            inference_context = inference_params
        if inference_context is not None and not self.training:
            if packed_seq_params is not None:
                raise NotImplementedError("Mamba2Mixer: packed sequences in inference mode")
            return self._static_inference(hidden_states, inference_context)
        zxBCdt, _ = self.in_proj(hidden_states)
        seq_idx = None
        if packed_seq_params is not None:
            seq_idx = document_seq_idx(packed_seq_params, *zxBCdt.shape[:2])
        y, _, _ = self._ssm(zxBCdt, seq_idx=seq_idx)
        return self.out_proj(y)

    def _fast_kernels(self, activations: torch.Tensor):
        """``(causal_conv1d_fn, mamba_chunk_scan_combined)`` for these activations, or None
        (not on CUDA, packages missing, or ``use_fast_kernels`` off)."""
        return _cuda_kernels() if (activations.is_cuda and self.use_fast_kernels) else None

    def _conv_kernel(self, conv_fn, xBC, seq_idx, want_state):
        """causal_conv1d + SiLU: xBC [b, l, conv_dim] -> (out [b, l, conv_dim], conv state or None).

        causal_conv1d resets at document starts only in channel-last layout (``x [b, d, l]`` with
        ``stride(1) == 1``; megatron's MambaMixer feeds it the same way), so that layout is used
        with ``seq_idx``; without it the proven channel-first call is kept."""
        channels_first = xBC.transpose(1, 2)  # [b, conv_dim, l], a view
        state = conv_state_of(channels_first, self.d_conv, seq_idx) if want_state else None
        weight, bias = self.conv1d.weight[:, 0, :], self.conv1d.bias
        if seq_idx is None:
            out = conv_fn(channels_first.contiguous(), weight, bias, activation="silu")
        else:
            out = conv_fn(xBC.contiguous().transpose(1, 2), weight, bias,
                          seq_idx=seq_idx.to(torch.int32).contiguous(), activation="silu")
        return out.transpose(1, 2), state

    def _ssm(self, zxBCdt, conv_state=None, ssm_state=None, want_state=False, seq_idx=None):
        """zxBCdt [l, b, proj_local] -> (y [l, b, d_inner_local], conv_state, ssm_state).
        ``seq_idx [b, l]``: document ids; no conv or SSM state crosses a change of id."""
        L, b, _ = zxBCdt.shape
        zxBCdt = zxBCdt.transpose(0, 1)  # [b, l, .]
        z, xBC, dt = torch.split(
            zxBCdt, [self.d_inner_local_tp, self.conv_dim_local, self.nheads_local_tp], dim=-1)
        kernels = self._fast_kernels(zxBCdt)

        if kernels is not None and conv_state is None:
            xBC, new_conv_state = self._conv_kernel(kernels[0], xBC, seq_idx, want_state)
        else:
            xBC, new_conv_state = causal_depthwise_conv1d(
                xBC.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, conv_state,
                seq_idx=seq_idx)
            xBC = self.act(xBC).transpose(1, 2)  # [b, l, conv_dim]
        gn = self.ngroups_local_tp * self.d_state
        x, B, C = torch.split(xBC, [self.d_inner_local_tp, gn, gn], dim=-1)
        x = x.reshape(b, L, self.nheads_local_tp, self.headdim)
        B = B.reshape(b, L, self.ngroups_local_tp, self.d_state)
        C = C.reshape(b, L, self.ngroups_local_tp, self.d_state)
        A = -torch.exp(self.A_log.float())

        if kernels is not None:
            # The kernel's own final state comes back in C's dtype (bf16 in bf16 runs): rounded
            # once more than the torch path's, so cached decoding would continue from a state
            # the training forward never had. Take only y from the kernel and compute the final
            # state in fp32 beside it (prefill only; one O(l) contraction).
            y = kernels[1](
                x.contiguous(), dt.contiguous(), A, B.contiguous(), C.contiguous(), self.chunk_size,
                D=self.D, z=None, dt_bias=self.dt_bias.float(), dt_softplus=True,
                initial_states=None if ssm_state is None else ssm_state.float(),
                return_final_states=False,
                seq_idx=None if seq_idx is None else seq_idx.to(torch.int32).contiguous())
            new_ssm_state = None
            if want_state:
                new_ssm_state = ssd_final_state(
                    x, F.softplus(dt.float() + self.dt_bias.float()), A, B, ssm_state,
                    seq_idx=seq_idx)
        else:
            dt = F.softplus(dt.float() + self.dt_bias.float())
            y, new_ssm_state = ssd_scan_chunked(x, dt, A, B, C, self.chunk_size, D=self.D,
                                                initial_state=ssm_state, seq_idx=seq_idx)
        y = y.reshape(b, L, self.d_inner_local_tp).transpose(0, 1)  # [l, b, d_inner]
        y = self.norm(y, z.transpose(0, 1))
        return y, new_conv_state, new_ssm_state

    def allocate_inference_state(self, batch: int, device=None, conv_dtype=None,
                                 ssm_dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        """Zero ``(conv_state [b, conv_dim_local, d_conv], ssm_state [b, h_local, p, n])``.
        The SSM state defaults to fp32 (it accumulates over the whole sequence)."""
        device = device if device is not None else self.conv1d.weight.device
        conv_dtype = conv_dtype or self.conv1d.weight.dtype
        conv_shape, ssm_shape = self.mamba_state_shapes_per_request()
        return (torch.zeros(batch, *conv_shape, device=device, dtype=conv_dtype),
                torch.zeros(batch, *ssm_shape, device=device, dtype=ssm_dtype))

    def mamba_state_shapes_per_request(self) -> Tuple[Tuple[int, int], Tuple[int, int, int]]:
        """Per-request ``(conv_state_shape, ssm_state_shape)``, as MambaMixer reports them."""
        return (self.conv_dim_local, self.d_conv), (self.nheads_local_tp, self.headdim, self.d_state)

    def _fold_bias(self, out, bias):
        return out if bias is None else out + bias

    def forward_with_state(self, hidden_states, conv_state=None, ssm_state=None, seq_idx=None):
        """Prefill: hidden_states [s, b, d] -> (out [s, b, d], conv_state, ssm_state).

        Given states continue a sequence (chunked prefill); None starts one. Returns new states
        (fp32 SSM state; conv state in the activations' dtype); out includes the out_proj bias.
        ``seq_idx [b, s]`` (packed documents): states reset at each new document; given states
        belong to the first document and the returned ones are the last document's.
        """
        zxBCdt, _ = self.in_proj(hidden_states)
        y, conv_state, ssm_state = self._ssm(zxBCdt, conv_state, ssm_state, want_state=True,
                                             seq_idx=seq_idx)
        out, bias = self.out_proj(y)
        return self._fold_bias(out, bias), conv_state, ssm_state

    def step(self, hidden_states, conv_state, ssm_state):
        """One decoding token: hidden_states [1, b, d] or [b, d] -> (out same shape, conv_state,
        ssm_state). Returns new states; the inputs are left untouched."""
        squeeze = hidden_states.dim() == 2
        if squeeze:
            hidden_states = hidden_states[None]
        if hidden_states.shape[0] != 1:
            raise ValueError(f"step() takes one token, got sequence length {hidden_states.shape[0]}; "
                             f"use forward_with_state() for several")
        zxBCdt, _ = self.in_proj(hidden_states)
        z, xBC, dt = torch.split(
            zxBCdt[0], [self.d_inner_local_tp, self.conv_dim_local, self.nheads_local_tp], dim=-1)
        xBC, conv_state = conv_step(xBC, self.conv1d.weight, self.conv1d.bias, conv_state)
        xBC = self.act(xBC)
        gn = self.ngroups_local_tp * self.d_state
        x, B, C = torch.split(xBC, [self.d_inner_local_tp, gn, gn], dim=-1)
        b = x.shape[0]
        x = x.reshape(b, self.nheads_local_tp, self.headdim)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        A = -torch.exp(self.A_log.float())
        y, new_ssm = ssd_step(x, dt, A, B.reshape(b, self.ngroups_local_tp, self.d_state),
                              C.reshape(b, self.ngroups_local_tp, self.d_state), ssm_state)
        y = y + x.float() * self.D.float()[:, None]
        y = self.norm(y.reshape(b, self.d_inner_local_tp).to(z.dtype)[None], z[None])
        out, bias = self.out_proj(y)
        out = self._fold_bias(out, bias)
        # ssd_step computes in fp32 (fp64 for an fp64 model) and new_ssm stays so: casting it
        # back to a low-precision input state would round the recurrence at every token.
        return (out[0] if squeeze else out), conv_state, new_ssm

    def _static_inference(self, hidden_states, ctx):
        """megatron StaticInferenceContext: states live in ctx.key_value_memory_dict[layer_number]
        and are updated in place; offset 0 starts a sequence."""
        if not ctx.is_static_batching():
            raise NotImplementedError("Mamba2Mixer supports only static-batching inference contexts")
        batch = hidden_states.shape[1]
        cached = ctx.key_value_memory_dict.get(self.layer_number)
        if cached is None or cached[0].shape[0] != batch:
            cached = self.allocate_inference_state(batch, device=hidden_states.device,
                                                   conv_dtype=hidden_states.dtype)
            ctx.key_value_memory_dict[self.layer_number] = cached
        conv_state, ssm_state = cached
        if ctx.sequence_len_offset == 0:
            conv_state.zero_()
            ssm_state.zero_()
        if hidden_states.shape[0] == 1 and ctx.sequence_len_offset > 0:
            out, new_conv, new_ssm = self.step(hidden_states, conv_state, ssm_state)
        else:
            out, new_conv, new_ssm = self.forward_with_state(hidden_states, conv_state, ssm_state)
        conv_state.copy_(new_conv)
        ssm_state.copy_(new_ssm)
        return out, None

    # ------------------------------------------------------------------------------------------
    # Checkpointing
    # ------------------------------------------------------------------------------------------

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Same keys and splits as megatron's MambaMixer: ``in_proj.weight.{z,x,B,C,dt}`` and
        ``conv1d.{weight,bias}.{x,B,C}``, each TP-sharded along dim 0 of its full component."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        sharded = make_sharded_tensors_for_checkpoint(
            own, prefix, {"A_log": 0, "dt_bias": 0, "D": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        for name, module in self.named_children():
            if name == "conv1d":
                sharded.update(make_sharded_tensors_for_checkpoint(
                    module.state_dict(prefix="", keep_vars=True), f"{prefix}{name}.",
                    {"weight": 0, "bias": 0}, sharded_offsets,
                    tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"]))
            else:
                sharded.update(sharded_state_dict_default(
                    module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group))

        gn = self.ngroups_local_tp * self.d_state
        key = f"{prefix}in_proj.weight"
        sharded[key] = split_sharded_tensor(
            sharded[key],
            [self.d_inner_local_tp, self.d_inner_local_tp, gn, gn, self.nheads_local_tp],
            ["z", "x", "B", "C", "dt"])
        for name in ("conv1d.weight", "conv1d.bias"):
            key = f"{prefix}{name}"
            if key in sharded:
                sharded[key] = split_sharded_tensor(
                    sharded[key], [self.d_inner_local_tp, gn, gn], ["x", "B", "C"])
        return sharded
