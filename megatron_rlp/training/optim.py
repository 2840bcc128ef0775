"""megatron-core's DDP wrapper and AdamW (plain or distributed) for our config; the learning-rate
schedule is built in schedule.py."""
from __future__ import annotations

from typing import List

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                       finalize_model_grads)
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.transformer.module import Float16Module

from megatron_rlp.config import RunConfig


def wrap_model(cfg: RunConfig, chunks: List[torch.nn.Module]) -> List[DistributedDataParallel]:
    """bf16 runs wrap each chunk in megatron's `Float16Module` (casts inputs/outputs); every run
    wraps in megatron's DDP, whose contiguous grad buffers the (distributed) optimizer needs.
    Chunks must already be on their device: DDP allocates its buffers on the current device."""
    overlap = cfg.parallel.overlap_grad_reduce
    if overlap is None:
        overlap = torch.cuda.is_available()
    dp = parallel_state.get_data_parallel_world_size()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        # Buckets let the reduce of the last layers' grads start while earlier layers still run
        # backward (Megatron-LM's default size); without overlap one bucket is cheapest.
        bucket_size=max(40_000_000, 1_000_000 * dp) if overlap else None,
    )
    wrapped = []
    for index, chunk in enumerate(chunks):
        if cfg.training.bf16:
            chunk = Float16Module(chunk.config, chunk)
        wrapped.append(DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_config, module=chunk,
            # Only the first chunk's buckets may skip the pre-forward all-gather.
            disable_bucketing=index > 0))
    # The schedules call this after the last backward: DP all-reduce (or reduce-scatter for the
    # distributed optimizer), TP all-reduce of sequence-parallel norm grads, PP embedding sync.
    # Megatron-LM's training.py sets it; without it each DP rank silently steps on its own grads.
    (chunk,) = wrapped  # one chunk per rank: interleaved pipeline stages are rejected
    chunk.config.finalize_model_grads_func = finalize_model_grads
    if overlap:
        # With overlap the schedule must hold the reduce back until the last micro-batch
        # (no_sync) and may start it from the pipeline schedule (start_grad_sync), as
        # Megatron-LM's training.py wires it; otherwise every micro-batch would reduce.
        chunk.config.no_sync_func = chunk.no_sync
        chunk.config.grad_sync_func = chunk.start_grad_sync
    return wrapped


def build_optimizer(cfg: RunConfig, model: List[torch.nn.Module]):
    o = cfg.optimizer
    opt_config = MegatronOptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=cfg.training.bf16,
        params_dtype=torch.bfloat16 if cfg.training.bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    return get_megatron_optimizer(opt_config, model)
