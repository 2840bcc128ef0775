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


def transformer_config(cfg: RunConfig, *, init_weights: bool = True) -> TransformerConfig:
    """megatron's config for our model. `init_weights` (attached as `config.init_weights`) says
    whether our seeded init runs; megatron's own `perform_initialization` is always off."""
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
        # Parameters are allocated on CPU (and moved to the GPU by the caller) and megatron draws
        # nothing: every weight it would draw is overwritten by `layout_invariant_init` or by the
        # Mamba2 mixer's own seeded init, so its draw (a full matrix per rank) would be wasted.
        use_cpu_initialization=True,
        perform_initialization=False,
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
    # Read by our init (mixer and `layout_invariant_init`): it depends only on (seed, global
    # layer or parameter name), not on TP/PP; `init_weights=False` skips it (checkpoint next).
    config.init_seed = t.seed
    config.init_weights = init_weights
    config.mamba_conv_kernel = m.mamba_conv_kernel
    config.mamba_chunk_size = m.mamba_chunk_size
    return config


def unwrap_model(model: torch.nn.Module) -> MambaModel:
    """The megatron MambaModel (one pipeline stage of it) inside any wrappers: megatron's DDP and
    Float16Module (`.module`), load_model's CausalLM (`.model`)."""
    inner = model
    while not isinstance(inner, MambaModel):
        wrapped = getattr(inner, "module", None)
        inner = wrapped if wrapped is not None else getattr(inner, "model", None)
        if inner is None:
            raise TypeError(f"{type(model).__name__} does not wrap a megatron MambaModel")
    return inner


def build_model(cfg: RunConfig, vocab_size: int, *, pre_process: bool = True,
                post_process: bool = True, vp_stage: Optional[int] = None,
                stack_spec=None, init_weights: bool = True) -> MambaModel:
    """The model (or this rank's pipeline stage of it). `vocab_size` is the tokenizer's; it is
    padded here. `stack_spec` lets a precision recipe swap linear classes. `init_weights=False`
    skips every random draw, for callers that load a checkpoint right after: the matrices then
    hold uninitialised memory (norm weights are ones, Mamba dt_bias/A_log small constants)."""
    from .spec import hybrid_stack_spec

    config = transformer_config(cfg, init_weights=init_weights)
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
    mark_tensor_parallel_weights(model)
    layout_invariant_init(model, config)
    if getattr(cfg.data, "reset_attention_mask", False):
        from .packed import refuse_attention_without_block_mask

        refuse_attention_without_block_mask(model)  # before any work, not at the first step
    return model


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Give megatron's TP layers' weights the `tensor_model_parallel` / `partition_dim` /
    `partition_stride` attributes.

    megatron sets them inside its CPU init helper (`_initialize_affine_weight_cpu`), which runs
    only with `perform_initialization`. DDP, the optimizer, grad-norm clipping, the dry run and
    `layout_invariant_init` read them, so without a draw we set what megatron would have: column
    layers and the vocab embedding split dim 0, row layers dim 1, stride 1 (no GLU interleave in
    this model). Weights that already carry them (TE layers, megatron's own init) are left alone."""
    from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                      VocabParallelEmbedding,
                                                      set_tensor_model_parallel_attributes)

    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, True, dim, 1)


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
    """Draw every matrix from a generator seeded by (seed, *global* parameter name): the full
    TP=1 tensor, of which this rank keeps its slice (bit-identically, a dim-0 split draws only
    the slice's rows and a dim-1 split never holds the full tensor, see
    `mamba2_layout.draw_slice`). Biases are zeroed as megatron does.

    megatron's CPU init draws full weights from the global generator in construction order, so it
    is TP-invariant but not PP-invariant (stage 1 starts from the seed again) and any change in
    what is built before a layer shifts its numbers; `transformer_config` therefore turns it off.
    After this, a TP×PP×DP run starts from exactly the weights of the one-process run. Norm weights
    (ones, set by their constructors) and the Mamba2 mixer (which seeds by global layer itself,
    see `mamba2_layout.init_local_parameters`) are left as built. Skipped unless
    `init_weights_requested(config)`.
    """
    from megatron.core import parallel_state

    from .mamba2 import Mamba2Mixer
    from .mamba2_layout import draw_slice, init_weights_requested, run_init_seed

    if not init_weights_requested(config):
        return
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    layers = model.decoder.layers
    skip = {id(p) for module in model.modules() if isinstance(module, Mamba2Mixer)
            for p in module.parameters()}
    seed = run_init_seed(config)
    for name, param in model.named_parameters():
        if id(param) in skip or param.is_meta:
            continue
        if param.dim() < 2:
            if name.endswith(".bias"):
                param.zero_()
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
        param_seed = zlib.crc32(f"{seed}:{global_name}".encode())
        rows, cols = (0, full_shape[0]), None
        if split_dim == 0:
            rows = (tp_rank * param.shape[0], (tp_rank + 1) * param.shape[0])
        elif split_dim == 1:
            cols = (tp_rank * param.shape[1], (tp_rank + 1) * param.shape[1])
        elif split_dim is not None:
            raise ValueError(f"{name}: tensor-parallel split along dim {split_dim} is not "
                             "supported by layout_invariant_init (only 0 and 1)")
        param.copy_(draw_slice(param_seed, init, full_shape, [rows], cols=cols))
