"""Mamba2 math in plain torch: the SSD scan (sequential reference, chunked algorithm, one step),
the causal depthwise conv and the gated RMSNorm. Used by `mamba2.Mamba2Mixer`; see its module
docstring for the data flow and shape legend (b batch, l positions, h heads, p head_dim, g groups,
n state_dim).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)

NORM_EPS = 1e-5


# ----------------------------------------------------------------------------------------------
# SSD scan: reference recurrence and chunked algorithm
# ----------------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 inputs stay fp64 (an oracle for tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def _heads_per_group(h: int, g: int) -> int:
    assert h % g == 0, (h, g)  # validated by the mixer; internal invariant here
    return h // g


def ssd_step(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    state: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step of the SSM recurrence (fp32, or fp64 for fp64 inputs).

    x [b,h,p], dt [b,h] (positive), A [h] (negative), B, C [b,g,n], state [b,h,p,n].
    Returns y [b,h,p] (without the D skip) and the new state.
    """
    h, g = x.shape[1], B.shape[1]
    k = _heads_per_group(h, g)
    ct = _compute_dtype(x)
    x, dt, A, B, C, state = (t.to(ct) for t in (x, dt, A, B, C, state))
    Bh = B.repeat_interleave(k, dim=1)  # [b,h,n]; head i reads group i // k
    Ch = C.repeat_interleave(k, dim=1)
    decay = torch.exp(dt * A)  # [b,h]
    state = state * decay[:, :, None, None] + (dt[:, :, None] * x)[..., None] * Bh[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, Ch)
    return y, state


def ssd_scan_reference(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: Optional[torch.Tensor] = None, initial_state: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Obviously-right sequential recurrence, a loop over time in fp32. Slow; for tests.

    ``seq_idx [b, l]`` (packed documents): the state is reset to zero wherever the document id
    changes; the initial state belongs to the first document."""
    b, L, h, p = x.shape
    n = B.shape[-1]
    ct = _compute_dtype(x)
    state = (
        torch.zeros(b, h, p, n, dtype=ct, device=x.device)
        if initial_state is None else initial_state.to(ct)
    )
    ys = []
    for t in range(L):
        if seq_idx is not None and t > 0:
            same_doc = (seq_idx[:, t] == seq_idx[:, t - 1]).to(ct)
            state = state * same_doc[:, None, None, None]
        y_t, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state)
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p, dtype=ct)
    if D is not None:
        y = y + x.to(ct) * D.to(ct)[:, None]
    return y.to(x.dtype), state


def segsum(a: torch.Tensor) -> torch.Tensor:
    """Stable segment sum: ``out[..., i, j] = sum_{k=j+1..i} a[..., k]`` for i >= j, -inf above.

    Computed by a masked cumsum rather than ``cumsum[i] - cumsum[j]`` so no large partial sums
    cancel (ssd_minimal's ``segsum``).
    """
    T = a.size(-1)
    a = a[..., None].expand(*a.shape, T)  # [..., k, j] = a_k
    strictly_lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    s = a.masked_fill(~strictly_lower, 0.0).cumsum(dim=-2)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=0)
    return s.masked_fill(~lower, -math.inf)


def ssd_scan_chunked(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    chunk_size: int, D: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None, seq_idx: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunked state-passing SSD scan (Mamba2 paper, Listing 1 "ssd_minimal"), fp32 math.

    1. intra-chunk outputs: quadratic (attention-like) form with decay mask exp(segsum);
    2. per-chunk states: what each chunk's inputs add to the state at the chunk's end;
    3. inter-chunk recurrence: states passed across chunks (small c x c decay matrix);
    4. state-to-output: each position reads the state entering its chunk.
    ``l`` not divisible by ``chunk_size`` is padded with dt = 0, which leaves the state unchanged
    (decay exp(0) = 1, input dt x = 0), so the returned final state is the one at position l.

    ``seq_idx [b, l]`` (packed documents, each id one contiguous run, non-decreasing): every decay
    factor linking two positions of different documents is zeroed, so no state crosses a boundary;
    the initial state belongs to the first document and the final state is the last document's.
    """
    b, L, h, p = x.shape
    g, n = B.shape[-2:]
    k = _heads_per_group(h, g)
    T = chunk_size
    out_dtype, ct = x.dtype, _compute_dtype(x)
    x, dt, A, B, C = (t.to(ct) for t in (x, dt, A, B, C))
    pad = (-L) % T
    if pad:
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c = x.shape[1] // T
    X = (x * dt[..., None]).reshape(b, c, T, g, k, p)  # inputs already scaled by dt
    Bc = B.reshape(b, c, T, g, n)
    Cc = C.reshape(b, c, T, g, n)
    a = (dt * A).reshape(b, c, T, h).permute(0, 3, 1, 2)  # [b,h,c,T] log-decay per step
    a_cum = a.cumsum(dim=-1)
    if seq_idx is not None:
        seq = seq_idx.to(torch.long)
        if pad:
            seq = torch.cat([seq, seq[:, -1:].expand(b, pad)], dim=1)
        seq = seq.reshape(b, c, T)
        doc_end = seq[:, :, -1]  # [b,c] document at each chunk's end
        doc_in = torch.cat([seq[:, :1, 0], doc_end], dim=1)  # [b,c+1] initial state, chunk ends

    # 1. intra-chunk (diagonal blocks): y_l = sum_{s<=l} (C_l . B_s) exp(a_{s+1..l}) X_s
    decay = torch.exp(segsum(a)).permute(0, 2, 1, 3, 4).reshape(b, c, g, k, T, T)  # [.., l, s]
    CB = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)
    if seq_idx is not None:
        decay = decay * (seq[:, :, :, None] == seq[:, :, None, :])[:, :, None, None]
    scores = CB[:, :, :, None] * decay  # [b,c,g,k,l,s]
    y_diag = torch.einsum("bcgkls,bcsgkp->bclgkp", scores, X)

    # 2. chunk states: S_c = sum_s exp(a_{s+1..T}) X_s B_s^T
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum).permute(0, 2, 3, 1)  # [b,c,T,h]
    if seq_idx is not None:
        decay_to_end = decay_to_end * (seq == doc_end[..., None])[..., None]
    Xd = X * decay_to_end.reshape(b, c, T, g, k, 1)
    states = torch.einsum("bcsgkp,bcsgn->bcgkpn", Xd, Bc).reshape(b, c, h, p, n)

    # 3. inter-chunk recurrence over chunk boundaries (prepend the initial state as chunk "-1")
    if initial_state is None:
        initial_state = torch.zeros(b, h, p, n, dtype=ct, device=x.device)
    states = torch.cat([initial_state.to(ct)[:, None], states], dim=1)  # [b,c+1,h,p,n]
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # [b,h,c+1,c+1]
    if seq_idx is not None:
        chunk_decay = chunk_decay * (doc_in[:, None, :, None] == doc_in[:, None, None, :])
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    states, final_state = states[:, :-1], states[:, -1]  # state entering each chunk; final

    # 4. off-diagonal contribution: y_l += exp(a_{1..l}) C_l . S_in
    decay_from_start = torch.exp(a_cum).permute(0, 2, 3, 1).reshape(b, c, T, g, k, 1)
    if seq_idx is not None:
        decay_from_start = decay_from_start * (seq == doc_in[:, :-1, None]).reshape(b, c, T, 1, 1, 1)
    y_off = torch.einsum("bclgn,bcgkpn->bclgkp", Cc, states.reshape(b, c, g, k, p, n))
    y = (y_diag + y_off * decay_from_start).reshape(b, c * T, h, p)[:, :L]
    if D is not None:
        y = y + x[:, :L] * D.to(ct)[:, None]
    return y.to(out_dtype), final_state


# ----------------------------------------------------------------------------------------------
# Causal depthwise conv and gated RMSNorm
# ----------------------------------------------------------------------------------------------


def causal_depthwise_conv1d(
    xBC: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    conv_state: Optional[torch.Tensor] = None, seq_idx: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv (no activation) over ``xBC [b, conv_dim, l]``.

    ``weight [conv_dim, 1, d_conv]``; ``conv_state [b, conv_dim, d_conv]`` holds the previous
    d_conv raw inputs (newest last; zeros = start of sequence). Returns ``(out [b,conv_dim,l],
    new_conv_state)`` where the new state is the last d_conv raw inputs.
    With ``seq_idx [b, l]`` (packed documents) a tap reading another document contributes zero,
    and the returned state keeps only the last document's inputs.
    """
    d_conv = weight.shape[-1]
    if conv_state is None:
        history = xBC.new_zeros(xBC.shape[0], xBC.shape[1], d_conv)
    else:
        history = conv_state.to(xBC.dtype)
    full = torch.cat([history, xBC], dim=-1)  # [b, conv_dim, d_conv + l]
    w = weight.to(xBC.dtype)
    if seq_idx is None:
        out = F.conv1d(full[..., 1:], w, None if bias is None else bias.to(xBC.dtype),
                       groups=xBC.shape[1])
        return out, full[..., -d_conv:].clone()
    L = xBC.shape[-1]
    seq_full = torch.cat([seq_idx[:, :1].expand(-1, d_conv), seq_idx], dim=1)  # history: 1st doc
    out = torch.zeros_like(xBC) if bias is None else bias.to(xBC.dtype)[None, :, None].expand_as(xBC)
    for k in range(d_conv):  # tap k reads full position t + 1 + k (= input t - (d_conv-1) + k)
        same_doc = (seq_full[:, 1 + k:1 + k + L] == seq_idx)[:, None, :]
        out = out + w[None, :, 0, k, None] * full[..., 1 + k:1 + k + L] * same_doc
    state_mask = (seq_full[:, -d_conv:] == seq_idx[:, -1:])[:, None, :]
    return out, full[..., -d_conv:] * state_mask


def conv_step(
    xBC: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], conv_state: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One token of the causal conv: ``xBC [b, conv_dim]`` -> ``(out [b, conv_dim], new_state)``."""
    state = torch.cat([conv_state[..., 1:], xBC[..., None].to(conv_state.dtype)], dim=-1)
    out = (state * weight[:, 0, :].to(state.dtype)).sum(dim=-1)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out, state


def gated_rms_norm(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float = NORM_EPS
) -> torch.Tensor:
    """``rmsnorm_grouped(y * silu(z)) * weight``, RMS taken over consecutive groups of
    ``group_size`` channels of the last dim (mamba_ssm RMSNormGated, norm_before_gate=False).
    Math in fp32, result in y's dtype."""
    shape = y.shape
    gated = y.float() * F.silu(z.float())
    gated = gated.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    normed = gated * torch.rsqrt(gated.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed.reshape(shape) * weight.float()).to(y.dtype)


class GatedRMSNorm(nn.Module):
    """Grouped, gated RMSNorm holding megatron's ``norm.weight`` (TP-sharded along dim 0)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = NORM_EPS, dtype=None,
                 device=None):
        super().__init__()
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.tp_group = None

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(y, z, self.weight, self.group_size, self.eps)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Weight sharded along axis 0 across TP, like megatron's ExtendedRMSNorm."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )
