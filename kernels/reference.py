"""Plain-torch reference for the NVFP4 kernels: slow, obviously right, device-agnostic.

Every function here has a Triton twin in ``triton_nvfp4.py``; tests hold each pair bit-equal
(``atol=rtol=0``). Numerics follow TransformerEngine >= 2.14 (``reference_nvfp4.py`` and the CUDA
``compute_decoding_scaling_factor``); all arithmetic is fp32. Shape legend: ``x`` is ``[M, K]``,
blocks run along K (the last dim), ``B = K // 16`` blocks per row.

    S    = min(2688 / amax, FLT_MAX), S = 1 if amax == 0 or S == 0          (global encode scale)
    SM   = S * fl(1/6)            1/6 folded into S first (TE >= 2.14; TE <= 2.13 did (bamax/6)*S)
    s_b  = E4M3_RNE(clamp(min(bamax * SM, FLT_MAX), 0, 448))                 (block decode scale)
    enc  = min(1 / (fp32(s_b) * fl(1/S)), FLT_MAX)
    q    = E2M1(clamp(x * enc, -6, 6))       RNE ties-to-even-code, or stochastic for gradients
    deq  = (e2m1_value(q) * fp32(s_b)) * fl(1/S)

Choices the spec leaves open, fixed here and mirrored by the kernel:
- Non-finite input (NaN or +-inf anywhere in a 16-block, or a non-finite global amax) poisons
  loudly and without a host sync: the block's scale byte becomes E4M3 NaN (0x7F) and its nibbles
  0, so the block dequantizes to NaN; a non-finite global amax is reported as NaN and poisons
  every block. (TE propagates NaN but turns an inf into silent garbage; we never do.)
- RHT is a 4-stage butterfly (strides 1, 2, 4, 8) after the sign flip, then * 1/4: the matmul
  ``x @ M`` sums in an unspecified order, the butterfly pins it (exact for most inputs anyway).
- Stochastic rounding draws u ~ U[0,1) from Triton's ``tl.rand(seed, flat_index)``
  (Philox4x32-10, first output) and rounds up iff u < (|y| - lo) / (hi - lo). TE uses the
  hardware ``cvt.rs`` instruction with its own random bits, so SR draws are not TE-bit-exact
  (the distribution is the same).
- Dequantize multiplies as ``(value * scale) * fl(1/S)``; the first product is exact.
"""
from __future__ import annotations

import torch

FP4_MAX = 6.0
FP8_MAX = 448.0
FLT_MAX = torch.finfo(torch.float32).max
BLOCK = 16

# RHT sign vector s (TE's fixed ``get_wgrad_sign_vector``), the same for every layer and call.
RHT_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
# E2M1 magnitudes by 3-bit code; bit 3 of a nibble is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E4M3_NAN_BYTE = 0x7F


def _f32(v: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32, device=like.device)


# --------------------------------------------------------------------------- global scale
def global_scales(amax: torch.Tensor) -> torch.Tensor:
    """fp32 ``[4]`` = (S, S*fl(1/6), fl(1/S), poisoned) from a 0-dim fp32 global amax.

    ``poisoned`` is 1.0 when amax is not finite. The Triton kernels redo these fp32 steps inside
    each program (``triton_nvfp4._global_scales``, IEEE ``div_rn``) to save a dozen tiny kernel
    launches per call; tests hold the two equal for every branch (amax 0, overflow, non-finite).
    """
    amax = amax.to(torch.float32).reshape(())
    bad = ~torch.isfinite(amax)
    s = torch.minimum(_f32(FP8_MAX * FP4_MAX, amax) / amax, _f32(FLT_MAX, amax))
    s = torch.where((amax == 0) | (s == 0) | bad, _f32(1.0, amax), s)
    sm = s * torch.reciprocal(_f32(FP4_MAX, amax))
    gds = _f32(1.0, amax) / s
    return torch.stack([s, sm, gds, bad.to(torch.float32)])


def amax_ref(x: torch.Tensor, *, rht: bool = False) -> torch.Tensor:
    """Global amax (fp32 0-dim) of ``x`` or of its RHT; NaN if anything is non-finite."""
    v = hadamard_ref(x) if rht else x
    a = v.to(torch.float32).abs().amax() if v.numel() else torch.zeros((), device=x.device)
    return torch.where(torch.isfinite(a), a, _f32(float("nan"), a))


# --------------------------------------------------------------------------- E4M3 / E2M1
def e4m3_round_ref(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RNE-round fp32 ``v`` (in [0, 448] or NaN) to E4M3: returns (fp32 value, uint8 byte)."""
    q = v.to(torch.float8_e4m3fn)
    return q.to(torch.float32), q.view(torch.uint8)


def e2m1_codes_rne(y: torch.Tensor) -> torch.Tensor:
    """E2M1 nibble (uint8 0..15) of fp32 ``y`` already clamped to [-6, 6]; ties go to the even code.

    Thresholds are the midpoints between E2M1 values: ``>`` at a midpoint whose lower neighbour
    has the even code, ``>=`` where the upper one has. NaN compares false everywhere: code 0.
    """
    a = y.abs()
    mag = ((a > 0.25).to(torch.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75)
           + (a > 2.5) + (a >= 3.5) + (a > 5.0))
    return mag | ((y < 0).to(torch.uint8) << 3)


def e2m1_value(mag: torch.Tensor) -> torch.Tensor:
    """fp32 magnitude of 3-bit E2M1 codes (any integer dtype)."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=mag.device)
    return table[mag.long()]


def philox_uniform_ref(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Exactly Triton's ``tl.rand(seed, offsets)``: Philox4x32-10, first output, as fp32 [0, 1).

    uint32 arithmetic runs in int64: a 32x32-bit product wraps modulo 2**64 (two's complement, as
    every torch backend does), and its high/low words are read back with a shift and a mask.
    The Triton tests compare these draws bit for bit, so a platform where that fails is caught.
    """
    m32 = 0xFFFFFFFF
    offsets = offsets.to(torch.int64)
    c0 = offsets & m32
    c1 = (offsets >> 32) & m32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & m32, (seed >> 32) & m32

    for _ in range(10):
        hi_b = c2 * 0xCD9E8D57             # full 64-bit products (wrapping), split below
        hi_a = c0 * 0xD2511F53
        c1_new, c3_new = hi_b & m32, hi_a & m32
        hi_b >>= 32
        hi_b &= m32
        hi_b ^= c1
        hi_b ^= k0
        hi_a >>= 32
        hi_a &= m32
        hi_a ^= c3
        hi_a ^= k1
        c0, c1, c2, c3 = hi_b, c1_new, hi_a, c3_new
        k0 = (k0 + 0x9E3779B9) & m32
        k1 = (k1 + 0xBB67AE85) & m32
    r = torch.where(c0 >= 2**31, c0 - 2**32, c0)      # bitcast to int32
    r = torch.where(r < 0, -r - 1, r)                  # ~x for negatives
    return r.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def e2m1_codes_sr(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Stochastically rounded E2M1 nibbles of clamped fp32 ``y`` with uniforms ``u`` in [0, 1).

    lo/hi are the E2M1 neighbours around |y|; round up iff u < (|y| - lo) / (hi - lo), so the
    expectation is |y| and only the two neighbours can occur. Both steps are exact in fp32.
    """
    a = y.abs()
    lo = ((a >= 0.5).to(torch.uint8) + (a >= 1.0) + (a >= 1.5) + (a >= 2.0)
          + (a >= 3.0) + (a >= 4.0) + (a >= 6.0))
    lo_v = e2m1_value(lo)
    # 1 / (hi - lo): the E2M1 grid spacing is 0.5 below 2, 1 below 4, 2 up to 6.
    inv_step = torch.where(lo < 4, 2.0, torch.where(lo < 6, 1.0, 0.5)).to(torch.float32)
    p = torch.where(lo == 7, 0.0, (a - lo_v) * inv_step)
    mag = lo + (u < p).to(torch.uint8)
    return mag | ((y < 0).to(torch.uint8) << 3)


# --------------------------------------------------------------------------- RHT
def hadamard_matrix(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """M = diag(s) . H16 / 4 (H16 in Sylvester order); orthogonal and exact in fp32/bf16."""
    h = torch.ones(1, 1)
    while h.shape[0] < BLOCK:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    s = torch.tensor(RHT_SIGNS, dtype=torch.float32)
    return (torch.diag(s) @ h / 4).to(dtype=dtype, device=device)


def _rht_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x @ M`` blockwise along the last dim, as a butterfly (order pinned: module doc)."""
    v = x.to(torch.float32).reshape(-1, BLOCK) * torch.tensor(RHT_SIGNS, dtype=torch.float32,
                                                              device=x.device)
    for h in (1, 2, 4, 8):
        t = v.reshape(-1, BLOCK // (2 * h), 2, h)
        a, b = t[:, :, 0, :], t[:, :, 1, :]
        v = torch.stack([a + b, a - b], dim=2).reshape(-1, BLOCK)
    return (v * 0.25).reshape(x.shape)


def _check_rht_input(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"hadamard_transform: dtype {x.dtype} unsupported; "
                         "pass float32 or bfloat16")
    if x.shape[-1] % BLOCK:
        raise ValueError(f"hadamard_transform: last dim {x.shape[-1]} must be a multiple "
                         f"of {BLOCK}")


def hadamard_ref(x: torch.Tensor) -> torch.Tensor:
    """Every 16-element block of the last dim times M; bf16 in -> result rounded to bf16 (as TE)."""
    _check_rht_input(x)
    return _rht_fp32(x).to(x.dtype)


def inverse_hadamard_ref(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``hadamard_ref`` (M^-1 = M^T), computed in fp32, returned in x's dtype."""
    _check_rht_input(x)
    mt = hadamard_matrix(device=x.device).t()
    return (x.to(torch.float32).reshape(-1, BLOCK) @ mt).reshape(x.shape).to(x.dtype)


# --------------------------------------------------------------------------- quantize
def quantize_ref(x: torch.Tensor, amax: torch.Tensor, *, block_2d: bool = False,
                 stochastic: bool = False, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` [M, K] (already RHT'd if wanted) with global ``amax``.

    Returns (data uint8 [M, K/2], scale float8_e4m3fn [M, K/16]). ``seed`` feeds the SR draws, which
    are indexed by the flat position ``m * K + k`` in ``x``.
    """
    m, k = x.shape
    g = global_scales(amax.to(x.device))
    sm, gds, poisoned = g[1], g[2], g[3] > 0
    xf = x.to(torch.float32).reshape(m, k // BLOCK, BLOCK)
    bad = ~torch.isfinite(xf)
    if block_2d:
        tiles = xf.abs().reshape(m // BLOCK, BLOCK, k // BLOCK, BLOCK)
        bamax = tiles.amax(dim=(1, 3)).repeat_interleave(BLOCK, dim=0)
        bbad = bad.reshape(m // BLOCK, BLOCK, k // BLOCK, BLOCK).any(dim=3).any(dim=1)
        bbad = bbad.repeat_interleave(BLOCK, dim=0)
    else:
        bamax = xf.abs().amax(dim=2)
        bbad = bad.any(dim=2)
    bbad = bbad | poisoned
    bamax = torch.where(bbad, 0.0, bamax)          # keep the scale math finite; poisoned below
    sb = torch.clamp(torch.minimum(bamax * sm, _f32(FLT_MAX, x)), 0.0, FP8_MAX)
    sb_f32, sb_byte = e4m3_round_ref(sb)
    enc = torch.minimum(_f32(1.0, x) / (sb_f32 * gds), _f32(FLT_MAX, x))
    y = torch.clamp(xf * enc.unsqueeze(-1), -FP4_MAX, FP4_MAX)
    if stochastic:
        offs = torch.arange(m * k, device=x.device, dtype=torch.int64).reshape(y.shape)
        codes = e2m1_codes_sr(y, philox_uniform_ref(seed, offs))
    else:
        codes = e2m1_codes_rne(y)
    codes = torch.where(bbad.unsqueeze(-1), 0, codes).to(torch.uint8).reshape(m, k)
    data = codes[:, 0::2] | (codes[:, 1::2] << 4)
    scale = torch.where(bbad, E4M3_NAN_BYTE, sb_byte).to(torch.uint8).view(torch.float8_e4m3fn)
    return data, scale


def dequantize_ref(data: torch.Tensor, scale: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """fp32 [M, K] from packed nibbles, per-row block scales and the global amax."""
    m = data.shape[0]
    k = data.shape[1] * 2
    codes = torch.stack([data & 0xF, data >> 4], dim=-1).reshape(m, k // BLOCK, BLOCK)
    val = e2m1_value(codes & 7)
    val = torch.where((codes & 8) != 0, -val, val)
    gds = global_scales(amax.to(data.device))[2]
    out = (val * scale.to(torch.float32).unsqueeze(-1)) * gds
    return out.reshape(m, k)
