"""Fixes for megatron-core 0.16.1 bugs that hit every host, CPU or GPU.

Unlike `cpu.py` (which stands in for CUDA where there is none), these correct megatron code paths
that are wrong whenever megatron falls back to torch's optimizers, i.e. whenever neither
TransformerEngine nor Apex is installed: the default on our CPU machines and on any GPU machine
without those extras. Each patch checks that it is needed and is applied once.
"""
from __future__ import annotations

from .cpu import _require


def patch_distributed_optimizer_step() -> None:
    """Without TE/Apex (always on CPU, and on GPU hosts without them) megatron uses torch's AdamW,
    whose state has a per-param `step`.
    `DistributedOptimizer.load_parameter_state_from_fully_reshardable` (optimizer/
    distrib_optimizer.py) skips `step` in the loaded tensors, then
    `_set_main_param_and_optimizer_states` copies every key of the param's state from them:
    `KeyError: 'step'`. `step` was already restored from the param groups by `load_state_dict`,
    so keep it as is."""
    module = _require("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer")
    cls = module.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states
    if getattr(original, "_megatron_rlp_patched", False):
        return

    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}  # copy_ onto itself: unchanged
        return original(self, model_param, tensors)

    set_states._megatron_rlp_patched = True
    cls._set_main_param_and_optimizer_states = set_states
