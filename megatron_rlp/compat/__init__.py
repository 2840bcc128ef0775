"""CPU/gloo shims for megatron-core 0.16.1; see `cpu.py` for what each patch replaces and why."""
from .cpu import apply_cpu_patches, cpu_patches_active

__all__ = ["apply_cpu_patches", "cpu_patches_active"]
