"""y = x W^T with NVFP4 fprop, dgrad and wgrad (GEMMs emulated on dequantized values in fp32).

Shape legend: x [T, K] tokens x input features, W [N, K], y / dy [T, N].

    fprop  y  = dq(Q_1x16,RNE(x))       @ dq(Q_16x16(W))^T
    dgrad  dx = dq(Q_1x16,SR(dy))       @ dq(Q_16x16(W))        (2D tiles: W and W^T quantize alike,
                                                                 so fprop's dq(W) is reused)
    wgrad  dW = dq(Q_1x16,SR(RHT(dy^T))) @ dq(Q_1x16,RNE(RHT(x^T)))^T
               (RHT along T, the reduction dim; M M^T = I so the rotations cancel in the product)

Blocks always run along the GEMM's reduction dimension, as the FP4 tensor cores need. Ablations
(recipe flags): ``use_rht=False`` drops the rotations, ``use_sr=False`` rounds gradients to nearest,
``use_2d_weights=False`` quantizes W (along K) and W^T (along N) separately with 1x16 blocks.

Two GEMM backends (``gemm=``):
- "emulated" (here): quantization is bit-faithful (``megatron_rlp.kernels.nvfp4``), the GEMM runs
  in fp32 on the dequantized operands with TF32 off. Any device.
- "te" (``te_gemm.py``): TransformerEngine's quantizers and FP4 tensor-core GEMMs (Blackwell,
  TE >= 2.14). Same quantizer numerics; fp32 accumulation in cuBLAS; TE's own SR draws.

TP: pass ``amax_reduce_group`` and every global amax is all-reduced (MAX) over it before quantizing,
so all ranks of a TP group use one global scale per tensor, exactly as an unsharded run would.
Token counts that are not a multiple of 16 are zero-padded for Wgrad only (zeros add nothing).
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_rlp.device import all_reduce
from megatron_rlp.kernels import nvfp4

from .recipe import NVFP4Recipe
from .stats import QUANT_STATS
from .te_gemm import TENVFP4LinearFunction
_BLOCK = nvfp4.BLOCK


def _role_seed(sr_seed: int, role: str) -> int:
    key = f"{sr_seed}|{role}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 2


@contextlib.contextmanager
def _fp32_matmul():
    """No TF32 on CUDA: dequantized operands carry full fp32 mantissas."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _amax(t: torch.Tensor, rht: bool, group, backend) -> Optional[torch.Tensor]:
    """Global amax, all-reduced (MAX) over ``group``; None lets quantize() compute it locally."""
    if group is None:
        return None
    return all_reduce(nvfp4.compute_amax(t, rht=rht, backend=backend).clone(), "max", group)


def quantize_operand(t: torch.Tensor, *, block_2d: bool = False, rht: bool = False,
                     stochastic: bool = False, seed: int = 0, group=None,
                     backend: Optional[str] = None) -> nvfp4.NVFP4Tensor:
    """Quantize one GEMM operand [rows, reduction] (blocks along the reduction dim), TP-aware."""
    if rht and t.dtype not in (torch.float32, torch.bfloat16):
        t = t.float()
    return nvfp4.quantize(t, block_2d=block_2d, rht=rht, stochastic=stochastic, seed=seed,
                          amax=_amax(t, rht, group, backend), backend=backend)


def _pad_tokens(t: torch.Tensor) -> torch.Tensor:
    """[rows, T] -> [rows, ceil16(T)] with zero columns (only when needed)."""
    pad = (-t.shape[1]) % _BLOCK
    return F.pad(t, (0, pad)) if pad else t


class NVFP4LinearFunction(torch.autograd.Function):
    """autograd for ``x2d @ W^T`` with NVFP4 operands; see the module docstring."""

    @staticmethod
    def forward(ctx, x2d, weight, use_rht: bool, use_sr: bool, use_2d: bool, sr_seed: int,
                group, backend):
        qx = quantize_operand(x2d, group=group, backend=backend)
        qw = quantize_operand(weight, block_2d=use_2d, group=group, backend=backend)
        wd = qw.dequantize(backend=backend)
        with _fp32_matmul():
            y = qx.dequantize(backend=backend) @ wd.t()
        QUANT_STATS["fprop"] += 1
        ctx.save_for_backward(x2d, weight, wd if use_2d else None)
        ctx.cfg = (use_rht, use_sr, use_2d, sr_seed, group, backend)
        return y.to(x2d.dtype)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, wd = ctx.saved_tensors
        use_rht, use_sr, use_2d, sr_seed, group, backend = ctx.cfg
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            qdy = quantize_operand(dy, stochastic=use_sr, seed=_role_seed(sr_seed, "dgrad"),
                                   group=group, backend=backend)
            if wd is None:          # 1D ablation: W^T gets its own 1x16 blocks along N
                wd = quantize_operand(weight.t(), group=group,
                                      backend=backend).dequantize(backend=backend).t()
            with _fp32_matmul():
                dx = (qdy.dequantize(backend=backend) @ wd).to(x2d.dtype)
            QUANT_STATS["dgrad"] += 1
        if ctx.needs_input_grad[1]:
            qdyt = quantize_operand(_pad_tokens(dy.t()), rht=use_rht, stochastic=use_sr,
                                    seed=_role_seed(sr_seed, "wgrad"), group=group,
                                    backend=backend)
            qxt = quantize_operand(_pad_tokens(x2d.t()), rht=use_rht, group=group,
                                   backend=backend)
            with _fp32_matmul():
                dw = (qdyt.dequantize(backend=backend)
                      @ qxt.dequantize(backend=backend).t()).to(weight.dtype)
            QUANT_STATS["wgrad"] += 1
        return dx, dw, None, None, None, None, None, None


def nvfp4_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                 recipe: Optional[NVFP4Recipe] = None, sr_seed: int = 0,
                 amax_reduce_group=None, backend: Optional[str] = None,
                 gemm: str = "emulated") -> torch.Tensor:
    """``x [..., K] @ weight[N, K]^T (+ bias)`` with NVFP4 GEMMs.

    sr_seed: stochastic-rounding seed for this call; derive it with ``recipe.sr_seed(seed,
             iteration, layer, role, microbatch=..., tp_rank=...)`` so resumed runs repeat it.
    amax_reduce_group: TP process group over which global amaxes are MAX-reduced (None: local).
    gemm: "emulated" or "te" (resolve "auto" first with ``te_gemm.resolve_gemm``); sr_seed and
          backend apply to the emulation only.
    """
    recipe = recipe or NVFP4Recipe(fp4="nvfp4")
    if weight.dim() != 2:
        raise ValueError(f"nvfp4_linear: weight must be 2D [N, K], got {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"nvfp4_linear: x has {x.shape[-1]} features, weight expects {k}")
    if k % _BLOCK or n % _BLOCK:
        raise ValueError(f"nvfp4_linear: weight [N={n}, K={k}] needs N and K multiples of "
                         f"{_BLOCK} (per TP shard); keep this layer in BF16 or pad the width")
    x2d = x.reshape(-1, k)
    if gemm == "te":
        y = TENVFP4LinearFunction.apply(x2d, weight, recipe.use_rht, recipe.use_sr,
                                        recipe.use_2d_weights, amax_reduce_group)
    elif gemm == "emulated":
        y = NVFP4LinearFunction.apply(x2d, weight, recipe.use_rht, recipe.use_sr,
                                      recipe.use_2d_weights, int(sr_seed), amax_reduce_group,
                                      backend)
    else:
        raise ValueError(f"nvfp4_linear: gemm={gemm!r} must be 'emulated' or 'te'")
    y = y.reshape(*x.shape[:-1], n)
    if bias is not None:
        y = y + bias
    return y
