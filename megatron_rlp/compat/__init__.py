"""Shims for megatron-core 0.16.1: `cpu.py` lets it run on CPU/gloo (applied only without CUDA);
`megatron_fixes.py` corrects upstream bugs that hit every host (applied where they are needed)."""
from .cpu import apply_cpu_patches, cpu_patches_active
from .megatron_fixes import patch_distributed_optimizer_step

__all__ = ["apply_cpu_patches", "cpu_patches_active", "patch_distributed_optimizer_step"]
