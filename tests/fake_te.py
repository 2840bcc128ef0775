"""A CPU stand-in for the slice of TransformerEngine's API that ``megatron_rlp.quant.te_gemm`` calls.

It models TE's semantics as read from TE's source (transformer_engine/pytorch/tensor/nvfp4_tensor.py,
csrc/quantizer.cpp, cpp_extensions/gemm.py), on top of our reference quantizer:

- ``NVFP4Quantizer(...)(x)`` makes a rowwise copy of x [rows, cols] (blocks along cols) and a
  columnwise copy, x^T quantized with blocks along rows; RHT (amax after it) applies to the
  columnwise copy only and, as in TE, only to BF16 input; SR draws come from torch's generator.
- ``general_gemm(A, B, layout)`` reads A rowwise if ``layout[0] == "T"`` else columnwise, B
  columnwise if ``layout[1] == "T"`` else rowwise (TE's ``_unwrap_tensor``), and returns
  ``(b @ a^T, None, None, None)`` on the dequantized copies: TN gives x @ W^T, NN dy @ W,
  NT dy^T @ x, for row-major torch tensors.

Tests install it with the ``fake_te`` fixture; ``made`` records every quantizer's settings.
"""
import sys
import types

import torch

from megatron_rlp.kernels import nvfp4
from megatron_rlp.quant.nvfp4_linear import quantize_operand


class FakeNVFP4Tensor:
    def __init__(self, rowwise: nvfp4.NVFP4Tensor, columnwise: nvfp4.NVFP4Tensor):
        self.rowwise, self.columnwise = rowwise, columnwise


def make_module(version: str = "2.14.0", nvfp4_available=(True, "")):
    made = []

    class NVFP4Quantizer:
        def __init__(self, rowwise=True, columnwise=True, with_amax_reduction=False,
                     amax_reduction_group=None, with_rht=False, with_post_rht_amax=False,
                     with_2d_quantization=False, stochastic_rounding=False):
            assert with_rht == with_post_rht_amax, "TE's recipe pairs RHT with post-RHT amax"
            self.settings = dict(rowwise=rowwise, columnwise=columnwise, rht=with_rht,
                                 two_d=with_2d_quantization, sr=stochastic_rounding,
                                 amax_reduction=with_amax_reduction)
            self.group = amax_reduction_group if with_amax_reduction else None
            made.append(self.settings)

        def __call__(self, x):
            s = self.settings
            assert x.is_contiguous()
            if s["rht"] and x.dtype != torch.bfloat16:
                raise RuntimeError(f"RHT is only supported for bfloat16 input, got {x.dtype}")

            def q(t, rht):
                seed = nvfp4.draw_seed() if s["sr"] else 0
                return quantize_operand(t, block_2d=s["two_d"], rht=rht, stochastic=s["sr"],
                                        seed=seed, group=self.group)

            return FakeNVFP4Tensor(q(x, False), q(x.t().contiguous(), s["rht"]))

    def general_gemm(A, B, out_dtype=None, layout="TN", grad=False, use_split_accumulator=False,
                     **unused):
        a = A.rowwise if layout[0] == "T" else A.columnwise
        b = B.columnwise if layout[1] == "T" else B.rowwise
        out = b.dequantize() @ a.dequantize().t()
        return out.to(out_dtype), None, None, None

    root = types.ModuleType("transformer_engine")
    root.__version__ = version
    pytorch = types.ModuleType("transformer_engine.pytorch")
    pytorch.NVFP4Quantizer = NVFP4Quantizer
    pytorch.is_nvfp4_available = lambda return_reason=False: (
        nvfp4_available if return_reason else nvfp4_available[0])
    cpp = types.ModuleType("transformer_engine.pytorch.cpp_extensions")
    cpp.general_gemm = general_gemm
    root.pytorch, pytorch.cpp_extensions = pytorch, cpp
    root.made = made
    return {"transformer_engine": root, "transformer_engine.pytorch": pytorch,
            "transformer_engine.pytorch.cpp_extensions": cpp}


def install(monkeypatch, **kwargs):
    """Put a fake TE into sys.modules for one test; returns its root module (``.made``)."""
    modules = make_module(**kwargs)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules["transformer_engine"]
