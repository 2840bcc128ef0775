"""NVFP4 quantization: public API over two backends.

``backend="reference"`` runs ``reference.py`` (plain torch, any device); ``backend="triton"`` runs
``triton_nvfp4.py`` (CUDA, or the CPU interpreter under ``TRITON_INTERPRET=1``). The default is
Triton when ``x`` is on a CUDA device, else the reference. Both produce identical bits; numerics and
the choices the spec leaves open (non-finite input, butterfly order, SR draws) are documented in
``reference.py``.

Non-finite input: a 16-block containing NaN/inf dequantizes to NaN (scale byte 0x7F, nibbles 0); a
non-finite global amax (reported as NaN) poisons every block. Nothing raises, nothing syncs, nothing
becomes silent finite garbage.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from . import reference as ref
from .reference import BLOCK, RHT_SIGNS, hadamard_matrix  # noqa: F401  (re-exported)

__all__ = ["NVFP4Tensor", "quantize", "dequantize", "compute_amax", "hadamard_transform",
           "inverse_hadamard_transform", "hadamard_matrix", "RHT_SIGNS", "draw_seed"]

_BACKENDS = ("reference", "triton")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass
class NVFP4Tensor:
    """A quantized 2D tensor.

    data:  uint8 [M, K/2], element 2j in the low nibble, bit 3 of a nibble is the sign.
    scale: float8_e4m3fn [M, K/16] block decode scales (2D: one per 16x16 tile, on its 16 rows).
    amax:  fp32 0-dim global amax (after RHT when ``rht``; NaN if the input was not finite).
    """
    data: torch.Tensor
    scale: torch.Tensor
    amax: torch.Tensor
    shape: torch.Size
    block_2d: bool = False
    rht: bool = False
    stochastic: bool = False

    def dequantize(self, backend: Optional[str] = None) -> torch.Tensor:
        """fp32 [M, K]; rotated domain when ``rht`` (see ``inverse_hadamard_transform``)."""
        return dequantize(self, backend=backend)


def _pick_backend(backend: Optional[str], device: torch.device) -> str:
    if backend is None:
        return "triton" if device.type == "cuda" else "reference"
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {_BACKENDS}")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before "
                         "triton is imported; use backend='reference' on CPU")
    return backend


def _check_input(x: torch.Tensor, block_2d: bool, rht: bool) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"quantize: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"quantize: x must be 2D [M, K], got shape {tuple(x.shape)}; "
                         "reshape to 2D first")
    if x.dtype not in _DTYPES:
        raise ValueError(f"quantize: dtype {x.dtype} unsupported; use one of {_DTYPES}")
    m, k = x.shape
    if k % BLOCK:
        raise ValueError(f"quantize: K={k} (last dim) must be a multiple of {BLOCK}; pad it")
    if block_2d and m % BLOCK:
        raise ValueError(f"quantize: block_2d needs M={m} (first dim) to be a multiple of {BLOCK}")
    if rht and x.dtype == torch.float16:
        raise ValueError("quantize: rht=True supports float32 and bfloat16 inputs, not float16")


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A 62-bit Philox seed from ``generator`` (CPU generator; default: torch's global one)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64).item())


@torch.no_grad()
def compute_amax(x: torch.Tensor, *, rht: bool = False, backend: Optional[str] = None
                 ) -> torch.Tensor:
    """Global amax (fp32 0-dim) of ``x`` or of its RHT (NaN if non-finite); for TP all-reduce."""
    _check_input(x, False, rht)
    if _pick_backend(backend, x.device) == "triton":
        from . import triton_nvfp4
        return triton_nvfp4.amax(x, rht=rht)
    return ref.amax_ref(x, rht=rht)


@torch.no_grad()
def quantize(x: torch.Tensor, *, block_2d: bool = False, rht: bool = False,
             stochastic: bool = False, generator: Optional[torch.Generator] = None,
             backend: Optional[str] = None, seed: Optional[int] = None,
             amax: Optional[torch.Tensor] = None) -> NVFP4Tensor:
    """Quantize ``x`` [M, K] (fp32/bf16/fp16) to NVFP4 with 1x16 (or 16x16 ``block_2d``) blocks.

    rht:        apply the 16-point RHT along K first (bf16 input: rounded to bf16), amax after it.
    stochastic: stochastic rounding; draws from ``seed``, else from one draw of ``generator``.
    amax:       precomputed global amax (e.g. all-reduced across TP ranks); default: computed here.
    """
    _check_input(x, block_2d, rht)
    if seed is not None and not 0 <= int(seed) < 2**63:
        raise ValueError(f"quantize: seed={seed} must be in [0, 2**63)")
    be = _pick_backend(backend, x.device)
    if stochastic and seed is None:
        seed = draw_seed(generator)
    seed = int(seed or 0)
    if be == "triton":
        from . import triton_nvfp4
        data, scale, used_amax = triton_nvfp4.quantize(x, block_2d=block_2d, rht=rht,
                                                       stochastic=stochastic, seed=seed, amax=amax)
    else:
        v = ref.hadamard_ref(x) if rht else x
        used_amax = ref.amax_ref(v) if amax is None else amax.to(torch.float32).reshape(())
        data, scale = ref.quantize_ref(v, used_amax, block_2d=block_2d, stochastic=stochastic,
                                       seed=seed)
        used_amax = torch.where(torch.isfinite(used_amax), used_amax,
                                torch.full_like(used_amax, float("nan")))
    # (the Triton kernel reports a non-finite amax as NaN itself: no extra launches)
    return NVFP4Tensor(data=data, scale=scale, amax=used_amax, shape=x.shape,
                       block_2d=block_2d, rht=rht, stochastic=stochastic)


@torch.no_grad()
def dequantize(q: NVFP4Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """fp32 [M, K] values of ``q`` (rotated domain if it was quantized with ``rht``)."""
    if _pick_backend(backend, q.data.device) == "triton":
        from . import triton_nvfp4
        return triton_nvfp4.dequantize(q.data, q.scale, q.amax)
    return ref.dequantize_ref(q.data, q.scale, q.amax)


@torch.no_grad()
def hadamard_transform(x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """Each 16-element block of the last dim times M = diag(s) . H16 / 4; bf16 output rounded."""
    if _pick_backend(backend, x.device) == "triton" and x.dim() == 2:
        from . import triton_nvfp4
        return triton_nvfp4.hadamard(x)
    return ref.hadamard_ref(x)


@torch.no_grad()
def inverse_hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``hadamard_transform`` (M is orthogonal: x @ M^T), fp32 math, x's dtype out."""
    return ref.inverse_hadamard_ref(x)
