"""GEMM counters shared by both NVFP4 GEMM backends (emulated and TransformerEngine).

``QUANT_STATS[role]`` counts the fprop / dgrad / wgrad GEMMs that ran through NVFP4 quantizers;
the trainer logs their sum as ``nvfp4_gemms`` and tests use it to prove the recipe is on.
"""
import collections

QUANT_STATS: collections.Counter = collections.Counter()
