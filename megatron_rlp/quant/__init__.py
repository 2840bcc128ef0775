"""NVFP4 training recipe: which layers are FP4 (recipe.py), the NVFP4 linear (nvfp4_linear.py,
GEMMs emulated) and its TransformerEngine FP4 tensor-core backend (te_gemm.py).

The model never imports this package: `integration.apply_nvfp4` converts a built model's planned
linears in place (megatron_rlp/extensions.py calls it right after the model is built).
"""
from .nvfp4_linear import NVFP4LinearFunction, nvfp4_linear, quantize_operand
from .recipe import (FP4_LINEARS, LayerPrecision, NVFP4Recipe, format_plan,
                     fp4_active, plan_for, precision_plan, scaled_bf16_layers, sr_seed,
                     switch_iteration)
from .stats import QUANT_STATS
from .te_gemm import TENVFP4LinearFunction, fp4_gemm_support, resolve_gemm

__all__ = ["QUANT_STATS", "NVFP4LinearFunction", "nvfp4_linear", "quantize_operand",
           "FP4_LINEARS", "LayerPrecision", "NVFP4Recipe", "format_plan",
           "fp4_active", "plan_for", "precision_plan", "scaled_bf16_layers", "sr_seed",
           "switch_iteration", "TENVFP4LinearFunction", "fp4_gemm_support", "resolve_gemm"]
