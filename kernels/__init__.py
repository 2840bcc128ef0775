"""megatron_rlp.kernels: Triton kernels with plain-torch references (see nvfp4.py, reference.py).

Imported lazily: ``import megatron_rlp.kernels.nvfp4`` does not import triton until the Triton
backend is used, so CPU users never pay for (or depend on) it.
"""
