"""Triton NVFP4 kernels: amax (+RHT), quantize (1D RNE, 1D SR, 2D 16x16, fused RHT), dequantize.

Bit-equal to ``reference.py`` (read its docstring for the numerics). One code path runs compiled on
CUDA and under ``TRITON_INTERPRET=1`` on CPU, which is why it avoids, on purpose:
- ``.to(tl.float8e4nv)`` (wrong in the interpreter): E4M3 scales are RNE-rounded with int bit ops;
- ``.to(tl.bfloat16)`` (truncates in the interpreter): bf16 rounding of RHT output is done on bits;
- ``tl.dot`` for the 16-point RHT (summation order unspecified): a butterfly with pinned order;
- fp32 ``/`` (may be approximate when compiled): ``tl.math.div_rn``;
- multi-config autotune (fails in the interpreter): block sizes are picked by ``_blocks``;
- FMA contraction (compiled code only; torch and the interpreter round every op): every launch
  passes ``enable_fp_fusion=False``. ``aot_check.py`` compiles every kernel for sm_90/sm_100
  without a GPU and checks the PTX has no fused multiply-add and no approximate division.

Tiles: a program owns ``[BM, BK]`` of x (BK a multiple of 16; BM a multiple of 16 for 2D), so it
owns whole 1x16 blocks and whole 16x16 tiles. x may be any strided 2D view (e.g. ``t()`` for the
transposed Wgrad copies) and is read once per pass; the global amax is a separate first pass
(per-program partial maxima, then one program reduces them), then quantize re-reads x and
recomputes the RHT instead of storing it.

Launches: the global scale step (``reference.global_scales``: a dozen fp32 scalar ops) runs inside
every quantize/dequantize program, with the same IEEE operations (``div_rn``), instead of as a
chain of tiny torch kernels. A 1D quantize is then 3 launches with the amax pass, 1 without; each
extra launch costs host time comparable to quantizing a whole 8192x8192 tensor on a modern GPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import BLOCK, FP4_MAX, FP8_MAX

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_SIGN_MASK = tl.constexpr(0xD7E8)          # bit i set <=> RHT_SIGNS[i] == -1
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
_NAN_BITS = tl.constexpr(0x7FC00000)
_S_NUM = tl.constexpr(FP8_MAX * FP4_MAX)                     # 2688: S = 2688 / amax
# fl(1/6): the fp32 reciprocal the reference folds into S (exactly representable, so the constant
# converts to fp32 without another rounding)
_INV_FP4_MAX = tl.constexpr(float(torch.reciprocal(torch.tensor(FP4_MAX, dtype=torch.float32))))
_AMAX_CHUNK = 1024


def _blocks(m: int, k: int, block_2d: bool = False) -> tuple[int, int, int]:
    """(BM, BK, num_warps). The interpreter costs ~10 ms per program: use few, large programs."""
    if INTERPRET:
        bk = min(512, max(16, triton.next_power_of_2(k)))
        bm = min(128, max(16, triton.next_power_of_2(m)))
        return bm, bk, 1
    return 32, 128, 4


# --------------------------------------------------------------------------- jit helpers
@triton.jit
def _load_tile(x_ptr, M, K, stride_m, stride_k, pid_m, pid_k, BM: tl.constexpr, BK: tl.constexpr,
               IS_BF16: tl.constexpr):
    """[BM, BK] fp32 tile. bf16 arrives as raw int16 bits and is widened by a shift: exact, and the
    interpreter's own bf16 -> fp32 conversion is wrong for subnormals."""
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_k * BK + tl.arange(0, BK)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :].to(tl.int64) * stride_k
    if IS_BF16:
        raw = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
        v = ((raw & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return v, rows, cols, mask


@triton.jit
def _round_bf16(v):
    """fp32 -> nearest-even bf16 value, kept in fp32 (bit ops; the interpreter's cast truncates)."""
    b = v.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _rht(v, BM: tl.constexpr, BK: tl.constexpr, ROUND_BF16: tl.constexpr):
    """[BM, BK] fp32 -> each 16-block times diag(s).H16/4; butterfly strides 1,2,4,8 like ref."""
    R: tl.constexpr = BM * BK // 16
    idx = tl.arange(0, 16)
    sgn = tl.where(((tl.full((16,), _SIGN_MASK, tl.int32) >> idx) & 1) != 0, -1.0, 1.0)
    w = tl.reshape(v, (R, 16)) * sgn[None, :]
    w = _butterfly(w, R, 1)
    w = _butterfly(w, R, 2)
    w = _butterfly(w, R, 4)
    w = _butterfly(w, R, 8)
    w = tl.reshape(w, (BM, BK)) * 0.25
    if ROUND_BF16:
        w = _round_bf16(w)
    return w


@triton.jit
def _butterfly(w, R: tl.constexpr, H: tl.constexpr):
    """(a, b) -> (a + b, a - b) for pairs (i, i + H) in groups of 2H (one rounding each)."""
    G: tl.constexpr = 16 // (2 * H)
    t = tl.reshape(w, (R, G, 2, H))
    pm = tl.where(tl.arange(0, 2) == 0, 1.0, -1.0)
    s = tl.sum(t, axis=2)                                   # a + b
    d = tl.sum(t * pm[None, None, :, None], axis=2)         # a + (-b) == a - b
    first = (tl.arange(0, 2) == 0)[None, None, :, None]
    out = tl.where(first, tl.expand_dims(s, 2), tl.expand_dims(d, 2))
    return tl.reshape(out, (R, 16))


@triton.jit
def _e4m3_rne(v):
    """v in [0, 448] fp32 -> (E4M3-rounded fp32 value, int32 byte), RNE, via integer bit ops."""
    b = v.to(tl.int32, bitcast=True)
    rb = (b + 0x7FFFF + ((b >> 20) & 1)) & -1048576         # keep 3 mantissa bits, ties to even
    normal = rb.to(tl.float32, bitcast=True)
    n_byte = (((rb >> 23) - 120) << 3) | ((rb >> 20) & 7)     # exponent bias 127 -> 7
    t = v * 512.0                                            # subnormals: multiples of 2^-9
    t = (t + 8388608.0) - 8388608.0                          # RNE to an integer (t < 2^22)
    sub = v < 0.015625
    val = tl.where(sub, t * 0.001953125, normal)
    byte = tl.where(sub, t.to(tl.int32), n_byte)
    return val, byte


@triton.jit
def _global_scales(amax_ptr):
    """(S * fl(1/6), fl(1/S), poisoned, amax or NaN) from the fp32 global amax at ``amax_ptr``.

    The fp32 steps of ``reference.global_scales`` in the same order: S = min(2688 / amax, FLT_MAX),
    S = 1 when amax is 0 or not finite or S underflows to 0. Computed on a [1] vector (constants
    as fp32 tensors for ``div_rn``) and reduced to scalars."""
    a = tl.load(amax_ptr + tl.arange(0, 1))
    bad = (a != a) | (tl.abs(a) > _FLT_MAX)
    one = tl.full([1], 1.0, tl.float32)
    s = tl.minimum(tl.math.div_rn(tl.full([1], _S_NUM, tl.float32), tl.where(a == 0.0, one, a)),
                   _FLT_MAX)
    s = tl.where((a == 0.0) | (s == 0.0) | bad, one, s)
    sm = s * _INV_FP4_MAX
    gds = tl.math.div_rn(one, s)
    clean = tl.where(bad, tl.full([1], _NAN_BITS, tl.int32).to(tl.float32, bitcast=True), a)
    return (tl.max(sm, axis=0), tl.max(gds, axis=0), tl.max(bad.to(tl.int32), axis=0), clean)


@triton.jit
def _e2m1_value(mag):
    """3-bit E2M1 code -> fp32 magnitude (0, .5, 1, 1.5, 2, 3, 4, 6) without a table."""
    v = tl.where(mag == 4, 2.0, tl.where(mag == 5, 3.0, tl.where(mag == 6, 4.0, 6.0)))
    return tl.where(mag < 4, mag.to(tl.float32) * 0.5, v)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _amax_kernel(x_ptr, part_ptr, bad_ptr, M, K, stride_m, stride_k, n_k,
                 RHT: tl.constexpr, IS_BF16: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    v, rows, cols, mask = _load_tile(x_ptr, M, K, stride_m, stride_k, pid_m, pid_k, BM, BK,
                                     IS_BF16)
    if RHT:
        v = _rht(v, BM, BK, IS_BF16)
    a = tl.abs(v)
    bad = ((v != v) | (a > _FLT_MAX)).to(tl.int32)                  # NaN or +-inf
    tl.store(part_ptr + pid_m * n_k + pid_k, tl.max(tl.max(a, axis=1), axis=0))
    tl.store(bad_ptr + pid_m * n_k + pid_k, tl.max(tl.max(bad, axis=1), axis=0))


@triton.jit
def _amax_reduce_kernel(part_ptr, bad_ptr, n, out_ptr, CHUNK: tl.constexpr):
    """One program: max of the n partial maxima, NaN if any tile was not finite (max is exact in
    any order)."""
    acc = tl.zeros([CHUNK], tl.float32)
    flag = tl.zeros([CHUNK], tl.int32)
    for start in range(0, n, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        acc = tl.maximum(acc, tl.load(part_ptr + offs, mask=offs < n, other=0.0))
        flag = tl.maximum(flag, tl.load(bad_ptr + offs, mask=offs < n, other=0))
    out = tl.where(tl.max(flag, axis=0) > 0,
                   tl.full([1], _NAN_BITS, tl.int32).to(tl.float32, bitcast=True),
                   tl.max(acc, axis=0))
    tl.store(out_ptr + tl.arange(0, 1), out)


@triton.jit
def _quantize_kernel(x_ptr, amax_ptr, amax_out_ptr, q_ptr, s_ptr, M, K, stride_m, stride_k, seed,
                     RHT: tl.constexpr, IS_BF16: tl.constexpr, BLOCK_2D: tl.constexpr,
                     STOCHASTIC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    NB: tl.constexpr = BK // 16
    v, rows, cols, mask = _load_tile(x_ptr, M, K, stride_m, stride_k, pid_m, pid_k, BM, BK,
                                     IS_BF16)
    if RHT:
        v = _rht(v, BM, BK, IS_BF16)
    sm, gds, poisoned, amax_clean = _global_scales(amax_ptr)   # poisoned: amax not finite
    # program (0, 0) reports the amax used (program ids are >= 0: the sum is 0 only there)
    tl.store(amax_out_ptr + tl.arange(0, 1), amax_clean, mask=(tl.arange(0, 1) + pid_m + pid_k) == 0)

    a = tl.abs(v)
    bad = ((v != v) | (a > _FLT_MAX)).to(tl.int32)
    a3 = tl.reshape(a, (BM, NB, 16))
    bad3 = tl.reshape(bad, (BM, NB, 16))
    if BLOCK_2D:
        a4 = tl.reshape(a, (BM // 16, 16, NB, 16))
        bad4 = tl.reshape(bad, (BM // 16, 16, NB, 16))
        t_amax = tl.max(tl.max(a4, axis=3), axis=1)                       # [BM/16, NB]
        t_bad = tl.max(tl.max(bad4, axis=3), axis=1)
        bamax = tl.reshape(tl.broadcast_to(tl.expand_dims(t_amax, 1), (BM // 16, 16, NB)),
                           (BM, NB))
        bbad = tl.reshape(tl.broadcast_to(tl.expand_dims(t_bad, 1), (BM // 16, 16, NB)),
                          (BM, NB))
    else:
        bamax = tl.max(a3, axis=2)                                        # [BM, NB]
        bbad = tl.max(bad3, axis=2)
    bbad = (bbad + poisoned) != 0
    bamax = tl.where(bbad, 0.0, bamax)

    sb = tl.minimum(tl.maximum(bamax * sm, 0.0), 448.0)                   # also min(., FLT_MAX)
    sb_val, sb_byte = _e4m3_rne(sb)
    den = sb_val * gds                          # 0 -> 1/0 = inf -> FLT_MAX, without a 0-division
    enc = tl.where(den == 0.0, _FLT_MAX,
                   tl.minimum(tl.math.div_rn(tl.full(den.shape, 1.0, tl.float32),
                                             tl.where(den == 0.0, 1.0, den)), _FLT_MAX))
    v3 = tl.reshape(v, (BM, NB, 16))
    y = v3 * enc[:, :, None]
    y = tl.minimum(tl.maximum(y, -6.0), 6.0)
    ay = tl.abs(y)
    if STOCHASTIC:
        offs = (rows[:, None].to(tl.int64) * K + cols[None, :].to(tl.int64))
        u = tl.reshape(tl.rand(seed, offs), (BM, NB, 16))
        lo = ((ay >= 0.5).to(tl.int32) + (ay >= 1.0).to(tl.int32) + (ay >= 1.5).to(tl.int32)
              + (ay >= 2.0).to(tl.int32) + (ay >= 3.0).to(tl.int32) + (ay >= 4.0).to(tl.int32)
              + (ay >= 6.0).to(tl.int32))
        inv_step = tl.where(lo < 4, 2.0, tl.where(lo < 6, 1.0, 0.5))
        p = tl.where(lo == 7, 0.0, (ay - _e2m1_value(lo)) * inv_step)
        mag = lo + (u < p).to(tl.int32)
    else:
        mag = ((ay > 0.25).to(tl.int32) + (ay >= 0.75).to(tl.int32) + (ay > 1.25).to(tl.int32)
               + (ay >= 1.75).to(tl.int32) + (ay > 2.5).to(tl.int32) + (ay >= 3.5).to(tl.int32)
               + (ay > 5.0).to(tl.int32))
    code = mag | ((y < 0.0).to(tl.int32) << 3)
    code = tl.where(bbad[:, :, None], 0, code)
    code = tl.reshape(code, (BM, BK // 2, 2))
    c_lo, c_hi = tl.split(code)
    packed = (c_lo | (c_hi << 4)).to(tl.uint8)

    hcols = pid_k * (BK // 2) + tl.arange(0, BK // 2)
    q_ptrs = q_ptr + rows[:, None].to(tl.int64) * (K // 2) + hcols[None, :]
    tl.store(q_ptrs, packed, mask=(rows[:, None] < M) & (hcols[None, :] < K // 2))
    sbyte = tl.where(bbad, 0x7F, sb_byte).to(tl.uint8)
    scols = pid_k * NB + tl.arange(0, NB)
    s_ptrs = s_ptr + rows[:, None].to(tl.int64) * (K // 16) + scols[None, :]
    tl.store(s_ptrs, sbyte, mask=(rows[:, None] < M) & (scols[None, :] < K // 16))


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, amax_ptr, out_ptr, M, K, BM: tl.constexpr,
                       BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    NB: tl.constexpr = BK // 16
    rows = pid_m * BM + tl.arange(0, BM)
    hcols = pid_k * (BK // 2) + tl.arange(0, BK // 2)
    rmask = rows[:, None] < M
    packed = tl.load(q_ptr + rows[:, None].to(tl.int64) * (K // 2) + hcols[None, :],
                     mask=rmask & (hcols[None, :] < K // 2), other=0).to(tl.int32)
    code = tl.reshape(tl.join(packed & 15, packed >> 4), (BM, NB, 16))
    val = _e2m1_value(code & 7)
    val = tl.where((code & 8) != 0, -val, val)
    scols = pid_k * NB + tl.arange(0, NB)
    sbyte = tl.load(s_ptr + rows[:, None].to(tl.int64) * (K // 16) + scols[None, :],
                    mask=rmask & (scols[None, :] < K // 16), other=0).to(tl.int32)
    # E4M3 byte -> fp32 built from its fields (no fp8 cast); 0x7F is NaN
    e = (sbyte >> 3) & 15
    mnt = sbyte & 7
    normal = (((e + 120) << 23) | (mnt << 20)).to(tl.float32, bitcast=True)
    sval = tl.where(e == 0, mnt.to(tl.float32) * 0.001953125, normal)
    sval = tl.where((sbyte & 127) == 127, tl.full(sval.shape, _NAN_BITS, tl.int32).to(
        tl.float32, bitcast=True), sval)
    _sm, gds, _poisoned, _amax = _global_scales(amax_ptr)   # unpacked: safest form compiled
    out = tl.reshape((val * sval[:, :, None]) * gds, (BM, BK))
    cols = pid_k * BK + tl.arange(0, BK)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], out,
             mask=rmask & (cols[None, :] < K))


@triton.jit
def _hadamard_kernel(x_ptr, out_ptr, M, K, stride_m, stride_k, IS_BF16: tl.constexpr,
                     BM: tl.constexpr, BK: tl.constexpr):
    v, rows, cols, mask = _load_tile(x_ptr, M, K, stride_m, stride_k,
                                     tl.program_id(0), tl.program_id(1), BM, BK, IS_BF16)
    w = _rht(v, BM, BK, IS_BF16)
    optrs = out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :]
    if IS_BF16:     # w is bf16-exact: store its top 16 bits (no interpreter cast involved)
        tl.store(optrs, (w.to(tl.int32, bitcast=True) >> 16).to(tl.int16), mask=mask)
    else:
        tl.store(optrs, w, mask=mask)


# --------------------------------------------------------------------------- launchers
def _raw(x: torch.Tensor) -> torch.Tensor:
    """bf16 tensors go in as int16 bit patterns (same strides); see ``_load_tile``."""
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x


def amax(x: torch.Tensor, *, rht: bool = False) -> torch.Tensor:
    """Global amax (fp32 0-dim) of x or its RHT; NaN when anything is non-finite."""
    m, k = x.shape
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    bm, bk, nw = _blocks(m, k)
    grid = (triton.cdiv(m, bm), triton.cdiv(k, bk))
    part = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=x.device)
    bad = torch.empty(grid[0] * grid[1], dtype=torch.int32, device=x.device)
    _amax_kernel[grid](_raw(x), part, bad, m, k, x.stride(0), x.stride(1), grid[1],
                       RHT=rht, IS_BF16=x.dtype == torch.bfloat16, BM=bm, BK=bk, num_warps=nw,
                       enable_fp_fusion=False)
    out = torch.empty((), dtype=torch.float32, device=x.device)
    _amax_reduce_kernel[(1,)](part, bad, part.numel(), out, CHUNK=_AMAX_CHUNK,
                              enable_fp_fusion=False)
    return out


_global_amax = amax          # quantize() takes a keyword named ``amax``


def quantize(x: torch.Tensor, *, block_2d: bool = False, rht: bool = False,
             stochastic: bool = False, seed: int = 0, amax: torch.Tensor | None = None):
    """Launch the fused (RHT +) quantize kernel; returns (data, scale, amax used; NaN if that
    amax is not finite)."""
    m, k = x.shape
    if amax is None:
        amax_t = _global_amax(x, rht=rht)
    else:
        amax_t = amax.to(device=x.device, dtype=torch.float32).reshape(()).contiguous()
    data = torch.empty((m, k // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty((m, k // BLOCK), dtype=torch.uint8, device=x.device)
    if not x.numel():
        return data, scale.view(torch.float8_e4m3fn), _nan_if_not_finite(amax_t)
    amax_out = torch.empty((), dtype=torch.float32, device=x.device)
    bm, bk, nw = _blocks(m, k, block_2d)
    grid = (triton.cdiv(m, bm), triton.cdiv(k, bk))
    _quantize_kernel[grid](_raw(x), amax_t, amax_out, data, scale, m, k, x.stride(0),
                           x.stride(1), seed, RHT=rht, IS_BF16=x.dtype == torch.bfloat16,
                           BLOCK_2D=block_2d, STOCHASTIC=stochastic, BM=bm, BK=bk, num_warps=nw,
                           enable_fp_fusion=False)
    return data, scale.view(torch.float8_e4m3fn), amax_out


def _nan_if_not_finite(a: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(a), a, torch.full_like(a, float("nan")))


def quantize_1d(x, amax=None):
    """1x16 blocks, round to nearest even."""
    return quantize(x, amax=amax)


def quantize_1d_sr(x, seed: int, amax=None):
    """1x16 blocks, stochastic rounding from Philox(seed, flat index)."""
    return quantize(x, stochastic=True, seed=seed, amax=amax)


def quantize_2d(x, amax=None):
    """16x16 tiles (weights): W and W^T dequantize identically."""
    return quantize(x, block_2d=True, amax=amax)


def quantize_rht(x, *, stochastic: bool = False, seed: int = 0, amax=None):
    """Fused RHT + amax + quantize for Wgrad operands (pass ``x.t()`` for the transposed copy)."""
    return quantize(x, rht=True, stochastic=stochastic, seed=seed, amax=amax)


def dequantize(data: torch.Tensor, scale: torch.Tensor, amax_t: torch.Tensor) -> torch.Tensor:
    m, k = data.shape[0], data.shape[1] * 2
    out = torch.empty((m, k), dtype=torch.float32, device=data.device)
    if out.numel():
        bm, bk, nw = _blocks(m, k)
        amax_t = amax_t.to(device=data.device, dtype=torch.float32).reshape(()).contiguous()
        grid = (triton.cdiv(m, bm), triton.cdiv(k, bk))
        _dequantize_kernel[grid](data, scale.view(torch.uint8), amax_t, out, m, k, BM=bm, BK=bk,
                                 num_warps=nw, enable_fp_fusion=False)
    return out


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Blockwise RHT of a 2D x along the last dim; bf16 in -> bf16 out (rounded), fp32 -> fp32."""
    if x.dtype not in (torch.float32, torch.bfloat16) or x.shape[-1] % BLOCK:
        raise ValueError(f"hadamard: need float32/bfloat16 with last dim % 16 == 0, "
                         f"got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    out = torch.empty((m, k), dtype=x.dtype, device=x.device)
    if out.numel():
        bm, bk, nw = _blocks(m, k)
        grid = (triton.cdiv(m, bm), triton.cdiv(k, bk))
        _hadamard_kernel[grid](_raw(x), _raw(out), m, k, x.stride(0), x.stride(1),
                               IS_BF16=x.dtype == torch.bfloat16, BM=bm, BK=bk, num_warps=nw,
                               enable_fp_fusion=False)
    return out
