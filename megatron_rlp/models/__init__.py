"""Hybrid Mamba-Transformer model built on megatron-core, and the pure-torch Mamba2 mixer."""
