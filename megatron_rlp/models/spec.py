"""Layer specs for the hybrid stack, built from one parametrised function.

megatron's own `mamba_layer_specs.py` imports TransformerEngine and mamba_ssm at module level and
fuses the pre-norms into TE linears. We spell the stack out with explicit norm modules so the same
spec runs on CPU (torch paths) and GPU; the linear classes are parameters so a precision recipe can
swap them without copying the tree.
"""
from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from .attention import SDPACoreAttention
from .mamba2 import Mamba2Mixer, Mamba2MixerSubmodules
from .norm import RMSNorm
from .stack import HybridStack, HybridStackSubmodules


def hybrid_stack_spec(column_linear=ColumnParallelLinear, row_linear=RowParallelLinear,
                      norm=RMSNorm, mixer=Mamba2Mixer) -> ModuleSpec:
    """MambaStack spec: `M` = norm → Mamba2 mixer, `*` = norm → GQA self-attention (no RoPE),
    `-` = norm → squared-ReLU MLP; every sublayer adds its output to the residual stream; the final
    norm is `norm` too (see stack.py)."""
    mamba_layer = ModuleSpec(
        module=MambaLayer,
        submodules=MambaLayerSubmodules(
            norm=norm,
            mixer=ModuleSpec(module=mixer, submodules=Mamba2MixerSubmodules(
                in_proj=column_linear, out_proj=row_linear)),
            mamba_bda=get_bias_dropout_add,
        ),
    )
    attention_layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column_linear,
                    core_attention=SDPACoreAttention,  # fused SDPA: no [s, s] scores
                    linear_proj=row_linear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
        ),
    )
    mlp_layer = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=column_linear, linear_fc2=row_linear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )
    return ModuleSpec(
        module=HybridStack,
        submodules=HybridStackSubmodules(
            mamba_layer=mamba_layer, attention_layer=attention_layer, mlp_layer=mlp_layer,
            final_norm=norm),
    )
