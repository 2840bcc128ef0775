"""The Nemotron-H-shaped hybrid language model on megatron-core's `MambaModel`.

Shape: token embedding → N layers from the hybrid pattern (M Mamba2, * GQA attention, - squared-ReLU
MLP), each pre-normed with RMSNorm and residual → final RMSNorm → untied output layer. No biases, no
position embedding (the Mamba layers carry position), no dropout.

This module turns our `RunConfig` into megatron's `TransformerConfig` and builds the model for the
current pipeline stage; process groups come from megatron's `parallel_state`, initialised by the
caller (see `megatron_rlp.training.distributed`).
"""
from __future__ import annotations

import math
import zlib
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.mamba.mamba_model import MambaModel
from megatron.core.transformer import TransformerConfig

from megatron_rlp.config import RunConfig


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 as in Nemotron-H. megatron's own is `torch.compile`d, which costs seconds of
    compile per process on CPU and cannot run where dynamo is disabled."""
    return F.relu(x).square()


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Round the vocab up so the embedding splits evenly over TP ranks (Megatron's rule)."""
    multiple = divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def transformer_config(cfg: RunConfig) -> TransformerConfig:
    m, p, t = cfg.model, cfg.parallel, cfg.training
    dtype = torch.bfloat16 if t.bf16 else torch.float32
    vpp_size = None
    if p.num_layers_per_virtual_pipeline_stage is not None:
        vpp_size = m.num_layers // (p.pipeline_model_parallel_size
                                    * p.num_layers_per_virtual_pipeline_stage)
    config = TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        mamba_num_heads=m.mamba_num_heads,
        mamba_head_dim=m.mamba_head_dim,
        mamba_state_dim=m.mamba_state_dim,
        mamba_num_groups=m.mamba_num_groups,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        add_bias_linear=False,
        gated_linear_unit=False,
        activation_func=squared_relu,
        init_method_std=m.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Identical init across TP layouts needs the full weights drawn on CPU then split.
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=dtype,
        bf16=t.bf16,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp_size,
        sequence_parallel=p.sequence_parallel,
        # Fusions need CUDA kernels (TE / apex / torch.compile); the torch paths are exact.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        deallocate_pipeline_outputs=False,
    )
    # Read by our Mamba2 mixer: its init depends only on (seed, global layer), not on TP/PP.
    config.init_seed = t.seed
    config.mamba_conv_kernel = m.mamba_conv_kernel
    config.mamba_chunk_size = m.mamba_chunk_size
    return config


def build_model(cfg: RunConfig, vocab_size: int, *, pre_process: bool = True,
                post_process: bool = True, vp_stage: Optional[int] = None,
                stack_spec=None) -> MambaModel:
    """The model (or this rank's pipeline stage of it). `vocab_size` is the tokenizer's; it is
    padded here. `stack_spec` lets a precision recipe swap linear classes."""
    from .spec import hybrid_stack_spec

    config = transformer_config(cfg)
    kwargs = {"vp_stage": vp_stage} if vp_stage is not None else {}
    model = MambaModel(
        config=config,
        mamba_stack_spec=stack_spec or hybrid_stack_spec(),
        vocab_size=padded_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by,
                                     cfg.parallel.tensor_model_parallel_size),
        max_sequence_length=cfg.training.seq_length,
        hybrid_override_pattern=cfg.model.hybrid_override_pattern,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="none",
        **kwargs,
    )
    layout_invariant_init(model, config)
    return model


# Parameters that megatron initialises with `output_layer_init_method` (std / sqrt(2 * layers)).
_SCALED_INIT_SUFFIXES = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def _global_name(name: str, layers) -> str:
    """`decoder.layers.<local i>.…` → `decoder.layers.<global i>.…` (layer_number is global)."""
    match = name.split(".")
    if len(match) > 2 and match[0] == "decoder" and match[1] == "layers":
        match[2] = str(layers[int(match[2])].layer_number - 1)
    return ".".join(match)


@torch.no_grad()
def layout_invariant_init(model: MambaModel, config: TransformerConfig) -> None:
    """Redraw every matrix from a generator seeded by (seed, *global* parameter name), drawing the
    full TP=1 tensor and keeping this rank's slice.

    megatron's CPU init draws full weights from the global generator in construction order, so it
    is TP-invariant but not PP-invariant (stage 1 starts from the seed again) and any change in
    what is built before a layer shifts its numbers. After this, a TP×PP×DP run starts from
    exactly the weights of the one-process run. Norm weights (ones) and the Mamba2 mixer (which
    already seeds by global layer, see `mamba2.init_full_parameters`) are left as built.
    """
    if not config.perform_initialization:
        return
    from megatron.core import parallel_state

    from .mamba2 import Mamba2Mixer
    from .mamba2_layout import run_init_seed, with_cpu_seed

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    layers = model.decoder.layers
    skip = {id(p) for module in model.modules() if isinstance(module, Mamba2Mixer)
            for p in module.parameters()}
    seed = run_init_seed(config)
    for name, param in model.named_parameters():
        if id(param) in skip or param.dim() < 2 or param.is_meta:
            continue
        full_shape = list(param.shape)
        split_dim = None
        if getattr(param, "tensor_model_parallel", False):
            split_dim = param.partition_dim
            assert getattr(param, "partition_stride", 1) == 1, name  # no GLU interleave here
            full_shape[split_dim] *= tp_size
        global_name = _global_name(name, layers)
        init = (config.output_layer_init_method if global_name.endswith(_SCALED_INIT_SUFFIXES)
                else config.init_method)
        full = with_cpu_seed(zlib.crc32(f"{seed}:{global_name}".encode()), init,
                             torch.empty(full_shape, dtype=torch.float32))
        if split_dim is not None:
            full = torch.chunk(full, tp_size, dim=split_dim)[tp_rank]
        param.copy_(full.to(param.dtype))
