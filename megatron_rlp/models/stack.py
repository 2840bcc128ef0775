"""`HybridStack`: megatron's `MambaStack` with the final norm taken from the layer spec.

megatron-core 0.16.1's `MambaStack.__init__` (ssm/mamba_block.py) builds its final norm with a
hard-coded `TENorm`, outside the spec. On a CUDA host without TransformerEngine that crashes at
build time, and with TE the norm carries an `_extra_state` key, so the same model would have a
different class and different checkpoint keys on CPU and GPU. Here the parent is told there is no
final norm and we build it from `submodules.final_norm` (our `RMSNorm` by default): one class, one
set of state-dict keys on every device, with no global patch of megatron.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from .norm import RMSNorm


@dataclass
class HybridStackSubmodules(MambaStackSubmodules):
    final_norm: Union[ModuleSpec, type] = RMSNorm


class HybridStack(MambaStack):
    def __init__(self, config, submodules: HybridStackSubmodules, *args,
                 post_layer_norm: bool = True, **kwargs):
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        # The parent's forward applies `final_norm` when both flags are set.
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = build_module(submodules.final_norm, config=self.config,
                                           hidden_size=self.config.hidden_size,
                                           eps=self.config.layernorm_epsilon)
