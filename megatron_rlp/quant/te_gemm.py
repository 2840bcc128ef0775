"""NVFP4 GEMMs on FP4 tensor cores through TransformerEngine (Blackwell, TE >= 2.14).

The same recipe as the emulated ``NVFP4LinearFunction`` (nvfp4_linear.py), with TE's CUDA
quantizers and cuBLAS block-scaled FP4 GEMMs in place of our kernels and the fp32 matmul of
dequantized operands:

    operand  quantizer (one per role)                     rowwise use      columnwise use
    x        1x16 RNE; RHT on the columnwise copy         fprop            wgrad  (x^T, RHT)
    W        16x16 tiles (1x16 with --no-use-2d-weights)   fprop            dgrad  (W^T)
    dy       1x16 SR; RHT on the columnwise copy          dgrad            wgrad  (dy^T, RHT)

    fprop  y  = general_gemm(W, x)            layout TN:  x  @ W^T
    dgrad  dx = general_gemm(W, dy, "NN")     layout NN:  dy @ W
    wgrad  dW = general_gemm(x, dy, "NT")     layout NT:  dy^T @ x

TE's GEMM layouts are column-major: ``general_gemm(A, B, layout)`` reads A rowwise when
``layout[0] == "T"`` and B columnwise when ``layout[1] == "T"``; the table above is what that means
for row-major torch tensors. Quantizer numerics are TE's, which our reference reproduces bit for bit
from TE 2.14 on (older TE orders the block-scale arithmetic differently), so switching between this
path and the emulation changes only the GEMM accumulation and the stochastic-rounding draws: TE draws
SR noise from torch's CUDA generator, not from our per-call hashed seeds, so a resumed run repeats
its SR draws only as far as that generator's state is restored.

Everything TE-specific is imported lazily inside functions: this module imports on machines without
TE or CUDA, and ``fp4_gemm_support`` says in one sentence why the TE path is unavailable there.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from .stats import QUANT_STATS

MIN_TE_VERSION = (2, 14)
# cuBLAS reads FP4 operands with 16-byte aligned rows: 32 E2M1 values (megatron's fp4_utils gives the
# same hardware reason), and each of the three GEMMs reads a different dimension contiguously
# (fprop K, dgrad N, wgrad tokens). Operands are zero-padded to multiples of it in both dimensions:
# padding never shares a 16-block with real values when the real size is a multiple of 16, and a
# ragged token count fills its last 16-block with zeros exactly as the emulation's padding does
# (the rest are all-zero blocks), so the real blocks quantize identically, the zeros add nothing
# to any product, and the padded outputs are sliced off. (The plan only admits
# weights whose dimensions are multiples of 16; Nemotron-H 12B's Mamba in_proj at TP8 is 2832
# rows per rank, a multiple of 16 but not of 32.)
TE_ALIGN = 32


def _te_version(te_module) -> Tuple[int, ...]:
    parts = []
    for piece in str(getattr(te_module, "__version__", "0")).split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def fp4_gemm_support(bf16: bool, use_rht: bool,
                     device: Optional[torch.device] = None) -> Tuple[bool, str]:
    """(available, reason): can this process run the recipe's GEMMs on TE's FP4 tensor cores?

    bf16/use_rht: the run's precision and recipe; TE's RHT kernels only take BF16 input.
    """
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 10:
        return False, (f"GPU compute capability {major}.{minor} has no FP4 tensor cores "
                       "(needs 10.0 or newer: Blackwell)")
    try:
        import transformer_engine
        import transformer_engine.pytorch as te
    except Exception as error:  # ImportError, or a CUDA/ABI mismatch raised at import
        return False, (f"transformer_engine does not import ({type(error).__name__}: {error}); "
                       "install the gpu extra: pip install -e '.[gpu]'")
    version = _te_version(transformer_engine)
    if version < MIN_TE_VERSION:
        want = ".".join(map(str, MIN_TE_VERSION))
        return False, (f"transformer_engine {transformer_engine.__version__} is older than "
                       f"{want} (its NVFP4 block scales differ from the recipe's numerics)")
    probe = getattr(te, "is_nvfp4_available", None)
    if probe is not None:
        ok, why = probe(return_reason=True)
        if not ok:
            return False, f"transformer_engine reports NVFP4 unavailable: {why}"
    if use_rht and not bf16:
        return False, ("TransformerEngine's RHT kernels take BF16 input only; train with --bf16 "
                       "(or --no-use-rht)")
    return True, f"TransformerEngine {transformer_engine.__version__} on sm_{major}{minor}"


def resolve_gemm(choice: str, support: Tuple[bool, str]) -> Tuple[str, str]:
    """``--fp4-gemm`` and the probe result -> ("te" | "emulated", one-line reason for the log).

    auto: TE where it is available, else the emulation; te: TE or a ValueError saying why not.
    """
    ok, why = support
    if choice == "emulated":
        return "emulated", "--fp4-gemm emulated"
    if ok:
        return "te", why
    if choice == "te":
        raise ValueError(f"--fp4-gemm te: TransformerEngine FP4 GEMMs are unavailable here: {why}; "
                         "use --fp4-gemm auto or emulated to emulate them")
    return "emulated", why


def _pad_aligned(t: torch.Tensor) -> torch.Tensor:
    """[r, c] -> [ceil32(r), ceil32(c)] with zeros (contiguous; a no-op copy-free when aligned)."""
    rows, cols = (-t.shape[0]) % TE_ALIGN, (-t.shape[1]) % TE_ALIGN
    return F.pad(t, (0, cols, 0, rows)) if rows or cols else t.contiguous()


def _quantizer(*, rht: bool = False, sr: bool = False, two_d: bool = False, group=None):
    """One TE NVFP4 quantizer making both the rowwise and the columnwise (transposed) copy."""
    from transformer_engine.pytorch import NVFP4Quantizer

    return NVFP4Quantizer(rowwise=True, columnwise=True,
                          with_amax_reduction=group is not None, amax_reduction_group=group,
                          with_rht=rht, with_post_rht_amax=rht,
                          with_2d_quantization=two_d, stochastic_rounding=sr)


def _general_gemm() -> Callable:
    from transformer_engine.pytorch.cpp_extensions import general_gemm

    return general_gemm


class TENVFP4LinearFunction(torch.autograd.Function):
    """autograd for ``x2d @ W^T`` with TE's NVFP4 quantizers and FP4 GEMMs (see module doc)."""

    @staticmethod
    def forward(ctx, x2d, weight, use_rht: bool, use_sr: bool, use_2d: bool, group):
        gemm = _general_gemm()
        tokens, (n, k) = x2d.shape[0], weight.shape
        qx = _quantizer(rht=use_rht, group=group)(_pad_aligned(x2d))
        qw = _quantizer(two_d=use_2d, group=group)(_pad_aligned(weight))
        y = gemm(qw, qx, out_dtype=x2d.dtype, use_split_accumulator=True)[0]
        QUANT_STATS["fprop"] += 1
        # The quantized copies are what backward needs (TE keeps both usages in one tensor);
        # they are TE tensor objects, so they ride on ctx rather than save_for_backward.
        ctx.qx, ctx.qw = qx, qw
        ctx.cfg = (tokens, n, k, x2d.dtype, weight.dtype, use_rht, use_sr, group)
        return y[:tokens, :n]

    @staticmethod
    def backward(ctx, dy):
        gemm = _general_gemm()
        tokens, n, k, x_dtype, w_dtype, use_rht, use_sr, group = ctx.cfg
        qdy = _quantizer(rht=use_rht, sr=use_sr, group=group)(_pad_aligned(dy))
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = gemm(ctx.qw, qdy, layout="NN", grad=True, out_dtype=x_dtype,
                      use_split_accumulator=True)[0][:tokens, :k]
            QUANT_STATS["dgrad"] += 1
        if ctx.needs_input_grad[1]:
            dw = gemm(ctx.qx, qdy, layout="NT", grad=True, out_dtype=w_dtype,
                      use_split_accumulator=True)[0][:n, :k]
            QUANT_STATS["wgrad"] += 1
        ctx.qx = ctx.qw = None
        return dx, dw, None, None, None, None
