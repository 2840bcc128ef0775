"""Mamba2 math in plain torch: the SSD scan (sequential reference, chunked algorithm, one step),
the causal depthwise conv and the gated RMSNorm. Used by `mamba2.Mamba2Mixer`; see its module
docstring for the data flow and shape legend (b batch, l positions, h heads, p head_dim, g groups,
n state_dim).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
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


# Decays below 1e-26 are flushed to exactly 0 (exponents are clamped at -60 first, and
# exp(-60) ~ 8.8e-27 falls under the threshold). That is 19 orders below what an fp32 output can
# resolve next to the unit decay on the diagonal, and it keeps subnormal floats out of the scan:
# on x86 CPUs exp with a subnormal, zero or -inf result, and products and matmuls that create
# subnormals, take slow paths (measured 3-100x per element, torch 2.13 AVX2), while exact zeros
# are fast. Long chunks decay that far in most heads.
_FLUSH_DECAY = 1e-26
_MIN_LOG_DECAY = -60.0


def _decay(log_decay: torch.Tensor) -> torch.Tensor:
    """``exp(log_decay)`` for log-decays (sums of dt A <= 0), flushed to 0 below 1e-26."""
    return F.threshold_(log_decay.clamp(min=_MIN_LOG_DECAY).exp_(), _FLUSH_DECAY, 0.0)


def _intra_chunk_decay(cum: torch.Tensor, keep: Optional[torch.Tensor],
                       dtype: torch.dtype) -> torch.Tensor:
    """``exp(cum_l - cum_s)`` for ``s <= l`` (and ``keep[l, s]``), else 0: ``cum [..., T]`` (fp64)
    -> ``[..., T, T]``.

    The exponent is a difference of two within-chunk cumulative sums, as in mamba_ssm's Triton
    kernels (``exp(dA_cs_m - dA_cs_k)`` in ``ssd_chunk_scan.py``): one pass instead of ssd_minimal's
    ``segsum`` (a masked cumsum over a [T, T] tensor, whose backward of flip, cumsum, flip per head
    and chunk dominated the CPU training step). ``cum`` is fp64 so the subtraction does not cancel:
    in fp32, positions deep in a fast-decaying chunk (|cum| ~ 100) lose ~1e-5 of their decay, which
    the tests would see. The upper triangle (positive exponents) is clamped to 0 before exp, so it
    cannot overflow, and zeroed after; small decays are flushed to 0 as in `_decay`.
    """
    E = (cum[..., :, None] - cum[..., None, :]).to(dtype)
    Ld = F.threshold_(E.clamp_(min=_MIN_LOG_DECAY, max=0.0).exp_(), _FLUSH_DECAY, 0.0).tril_()
    return Ld if keep is None else Ld.mul_(keep)


def _segment_matrix(keep: torch.Tensor) -> torch.Tensor:
    """``keep [b,1,1,c,T,T]`` (same document) -> ``[b*c, T, T]`` fp64, 1 where ``s <= l`` in the
    same document: the matrix of a cumulative sum that restarts at every document start."""
    b, _, _, c, T, _ = keep.shape
    return keep.reshape(b * c, T, T).tril().to(torch.float64)


def _along_chunk(matrix: Optional[torch.Tensor], v: torch.Tensor, transpose: bool = False
                 ) -> torch.Tensor:
    """``matrix @ v`` (or ``matrix^T @ v``) along the last dim of ``v [b,g,k,c,T]``, in
    ``matrix``'s dtype when given; ``matrix`` None is the plain cumulative sum (its transpose the
    suffix sum), computed in ``v``'s dtype.

    With documents (``matrix`` from `_segment_matrix`) the within-chunk sums restart at each
    document start. A plain cumsum followed by differences would be mathematically equal where
    it is used, but its rounding would depend on the previous document's values (its prefix
    sums carry them); in a matmul the other documents' terms are exact zeros, so a document's
    outputs do not change by a single bit when another document's tokens change.
    """
    if matrix is None:
        if transpose:
            return v.sum(dim=-1, keepdim=True) - v.cumsum(dim=-1) + v
        return v.cumsum(dim=-1)
    b, g, k, c, T = v.shape
    rows = v.to(matrix.dtype).permute(0, 3, 4, 1, 2).reshape(b * c, T, g * k)
    out = torch.bmm(matrix.transpose(1, 2) if transpose else matrix, rows)
    # contiguous: the [T, T] tensors built from it would otherwise inherit this permuted layout
    # (and every elementwise op and matmul on them would be several times slower)
    return out.view(b, c, T, g, k).permute(0, 3, 4, 1, 2).contiguous()


class _ChunkedScan(torch.autograd.Function):
    """Steps 1-4 of `ssd_scan_chunked` on chunked, head-major tensors, with a hand-written backward.

    Shapes (head i = group gi, head kk of the group; every tensor contiguous):
      X [b,g,k,c,T,p] inputs already scaled by dt;  a [b,g,k,c,T] log-decay dt A per step;
      B, C [b,g,c,T,n];  init [b,g,k,p,n] or None (zeros);
      keep None or [b,1,1,c,T,T] (0/1 floats: same document);
      end_mask, start_mask [b,1,1,c,T] and gate [b,1,1,c] (0/1 floats), all None without documents.
    Returns Y [b,g,k,c,T,p] (without the D skip) and the final state [b,g,k,p,n].

    With cum = cumsum(a) within each chunk (restarting at each document start when `keep` is
    given, see `_along_chunk`), per head and chunk (l, s positions; matrices [rows, cols]):
      (1) Ld[l,s] = exp(cum_l - cum_s) [s<=l] keep[l,s];  G = C B^T (per group);  Y  = (G o Ld) X
      (2) w_end[s] = exp(cum_{T-1} - cum_s) end_mask[s];               S_loc = (w_end X)^T B
      (3) S_0 = init;  S_{c+1} = exp(cum_{c,T-1}) gate_c S_c + S_loc,c       (S_c enters chunk c)
      (4) w_start[l] = exp(cum_l) start_mask[l];                     Y += w_start (C S_c^T)
    Backward applies the chain rule to (4), (3) in reverse chunk order, (2), (1); each exponent's
    gradient is (d factor) o factor, and d cum becomes d a by a suffix sum (one cumsum, one
    subtraction, on [.., T] only). Autograd through ssd_minimal's algebra materialised, flipped
    and cumsum'ed [T, T] tensors several times per step; this touches each [T, T] tensor a few
    times and keeps Ld and G as its only saved [T, T] tensors.
    `tests/test_mamba2.py` holds it to autograd through `ssd_scan_reference` and to gradcheck.
    """

    @staticmethod
    def forward(ctx, X, a, B, C, init, keep, end_mask, start_mask, gate):
        b, g, k, nc, T, p = X.shape
        n = B.shape[-1]
        Bh, Ch = B[:, :, None], C[:, :, None]  # broadcast over the k heads of a group
        segments = None if keep is None else _segment_matrix(keep)
        # fp64: the differences below must not cancel
        cum64 = _along_chunk(segments, a.to(torch.float64))
        cum = cum64.to(a.dtype)

        # (1) intra-chunk, quadratic form
        Ld = _intra_chunk_decay(cum64, keep, a.dtype)  # [b,g,k,c,T,T]
        G = C @ B.transpose(-1, -2)  # [b,g,c,T,T]
        Y = (Ld * G[:, :, None]) @ X

        # (2) what each chunk adds to the state at its end
        w_end = _decay((cum64[..., -1:] - cum64).to(a.dtype))
        if end_mask is not None:
            w_end = w_end * end_mask
        S_loc = (X * w_end[..., None]).transpose(-1, -2) @ Bh  # [b,g,k,c,p,n]

        # (3) state entering each chunk: a short sequential recurrence over chunks, each step
        #     decayed by its own chunk's total (no long prefix sums to cancel)
        decay = _decay(cum[..., -1])  # [b,g,k,c]
        if gate is not None:
            decay = decay * gate
        state = X.new_zeros(b, g, k, p, n) if init is None else init
        entering = []
        for ci in range(nc):
            entering.append(state)
            state = decay[..., ci, None, None] * state + S_loc[..., ci, :, :]
        S_in = torch.stack(entering, dim=3)  # [b,g,k,c,p,n]

        # (4) each position reads the state entering its chunk
        w_start = _decay(cum)
        if start_mask is not None:
            w_start = w_start * start_mask
        Q = Ch @ S_in.transpose(-1, -2)  # [b,g,k,c,T,p]
        Y.addcmul_(Q, w_start[..., None])

        ctx.save_for_backward(X, B, C, Ld, G, S_in, Q, decay, w_end, w_start, segments)
        return Y, state

    @staticmethod
    @once_differentiable
    def backward(ctx, dY, d_final):
        X, B, C, Ld, G, S_in, Q, decay, w_end, w_start, segments = ctx.saved_tensors
        nc = X.shape[3]
        Bh, Ch = B[:, :, None], C[:, :, None]
        dY = dY.contiguous()

        # (4) Y += w_start (C S_in^T)
        dQ = dY * w_start[..., None]
        d_cum = (dY * Q).sum(dim=-1) * w_start
        dS_in = dQ.transpose(-1, -2) @ Ch  # [b,g,k,c,p,n]
        dC = (dQ @ S_in).sum(dim=2)  # [b,g,c,T,n]

        # (3) reverse recurrence; d_next[c] is the gradient of the state leaving chunk c
        carry, d_next = d_final, [None] * nc
        for ci in reversed(range(nc)):
            d_next[ci] = carry
            carry = decay[..., ci, None, None] * carry + dS_in[..., ci, :, :]
        d_init = carry if ctx.needs_input_grad[4] else None
        d_next = torch.stack(d_next, dim=3)  # [b,g,k,c,p,n] = d S_loc
        d_log_decay = (d_next * S_in).sum(dim=(-1, -2)) * decay  # [b,g,k,c]

        # (2) S_loc = (w_end X)^T B
        dXw = Bh @ d_next.transpose(-1, -2)  # [b,g,k,c,T,p]
        dB = ((X * w_end[..., None]) @ d_next).sum(dim=2)
        dX = dXw * w_end[..., None]
        d_log_w_end = (dXw * X).sum(dim=-1) * w_end  # exponent cum_{T-1} - cum_s
        d_cum -= d_log_w_end
        d_cum[..., -1] += d_log_w_end.sum(dim=-1) + d_log_decay

        # (1) Y = (G o Ld) X
        M = Ld * G[:, :, None]
        dM = dY @ X.transpose(-1, -2)  # [b,g,k,c,T,T]
        dX += M.transpose(-1, -2) @ dY
        dG = (dM * Ld).sum(dim=2)
        dC += dG @ B
        dB += dG.transpose(-1, -2) @ C
        dE = dM.mul_(M)  # exponent cum_l - cum_s (zero where masked, as M is)
        d_cum += dE.sum(dim=-1) - dE.sum(dim=-2)

        # cum = cumsum(a) => da_t = sum_{s >= t} d cum_s (within t's document with documents)
        da = _along_chunk(segments, d_cum, transpose=True).to(d_cum.dtype)
        return dX, da, dB, dC, d_init, None, None, None, None


def ssd_scan_chunked(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    chunk_size: int, D: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None, seq_idx: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunked state-passing SSD scan (Mamba2 paper, Listing 1 "ssd_minimal"), fp32 math.

    1. intra-chunk outputs: quadratic (attention-like) form with decay mask exp(cum_l - cum_s);
    2. per-chunk states: what each chunk's inputs add to the state at the chunk's end;
    3. inter-chunk recurrence: states passed across chunk boundaries, one chunk at a time;
    4. state-to-output: each position reads the state entering its chunk.
    Steps 1-4 run in `_ChunkedScan` (hand-written backward); the reshapes around it are autograd.
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
    c = (L + pad) // T

    # Head-major, chunked, contiguous (one copy of x, B, C each): the matmuls in _ChunkedScan
    # then batch over (b, g, k, c) with no further copies but B, C broadcast over the k heads of
    # their group. Head i is (group i // k, member i % k).
    X = (x * dt[..., None]).transpose(1, 2)  # [b,h,l,p]
    a = (dt * A).transpose(1, 2)  # [b,h,l]
    Bt, Ct = B.transpose(1, 2), C.transpose(1, 2)  # [b,g,l,n]
    if pad:
        X, Bt, Ct = (F.pad(t, (0, 0, 0, pad)) for t in (X, Bt, Ct))
        a = F.pad(a, (0, pad))
    X = X.contiguous().view(b, g, k, c, T, p)
    a = a.contiguous().view(b, g, k, c, T)
    Bt = Bt.contiguous().view(b, g, c, T, n)
    Ct = Ct.contiguous().view(b, g, c, T, n)
    init = None if initial_state is None else initial_state.to(ct).reshape(b, g, k, p, n)

    keep = end_mask = start_mask = gate = None
    if seq_idx is not None:
        seq = seq_idx.to(torch.long)
        if pad:
            seq = torch.cat([seq, seq[:, -1:].expand(b, pad)], dim=1)
        seq = seq.reshape(b, c, T)
        doc_end = seq[:, :, -1]  # [b,c] document at each chunk's end
        doc_in = torch.cat([seq[:, :1, 0], doc_end], dim=1)  # [b,c+1] initial state, chunk ends
        keep = (seq[:, :, :, None] == seq[:, :, None, :]).to(ct).view(b, 1, 1, c, T, T)
        end_mask = (seq == doc_end[..., None]).to(ct).view(b, 1, 1, c, T)
        start_mask = (seq == doc_in[:, :-1, None]).to(ct).view(b, 1, 1, c, T)
        gate = (doc_in[:, 1:] == doc_in[:, :-1]).to(ct).view(b, 1, 1, c)

    Y, final_state = _ChunkedScan.apply(X, a, Bt, Ct, init, keep, end_mask, start_mask, gate)
    y = Y.view(b, h, c * T, p)[:, :, :L].transpose(1, 2)  # [b,l,h,p]
    if D is not None:
        y = y + x * D.to(ct)[:, None]
    return y.to(out_dtype), final_state.reshape(b, h, p, n)


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
        return out, conv_state_of(full, d_conv)
    L = xBC.shape[-1]
    seq_full = torch.cat([seq_idx[:, :1].expand(-1, d_conv), seq_idx], dim=1)  # history: 1st doc
    out = torch.zeros_like(xBC) if bias is None else bias.to(xBC.dtype)[None, :, None].expand_as(xBC)
    # One masked multiply-add per tap (d_conv of them), never a loop over documents. A tap that
    # reads another document adds an exact zero, so outputs do not depend on it by a single bit.
    for k in range(d_conv):  # tap k reads full position t + 1 + k (= input t - (d_conv-1) + k)
        same_doc = (seq_full[:, 1 + k:1 + k + L] == seq_idx)[:, None, :]
        out = out + w[None, :, 0, k, None] * full[..., 1 + k:1 + k + L] * same_doc
    return out, conv_state_of(full, d_conv, seq_full)


def conv_state_of(inputs: torch.Tensor, d_conv: int,
                  seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The conv state after ``inputs [b, conv_dim, t]`` (raw, pre-conv): its last ``d_conv``
    inputs, newest last, zero-padded on the left when ``t < d_conv``. With ``seq_idx [b, t]`` the
    inputs of documents before the last one are zeroed: decoding continues the last document only.
    Returns a new tensor."""
    t = inputs.shape[-1]
    state = F.pad(inputs, (d_conv - t, 0))  # a negative pad keeps the last d_conv
    if seq_idx is not None:
        in_last = F.pad((seq_idx == seq_idx[:, -1:]).to(inputs.dtype), (d_conv - t, 0))
        state = state * in_last[:, None, :]
    return state


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
