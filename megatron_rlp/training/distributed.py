"""Process-group and parallel-state setup: nccl on GPU, gloo on CPU, chosen automatically.

A plain `python -m megatron_rlp.train` runs as a world of one (megatron's layers always need
`parallel_state`); under torchrun the usual RANK/WORLD_SIZE/MASTER_ADDR variables are used.
"""
from __future__ import annotations

import datetime
import os
import tempfile

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as tp_random

from megatron_rlp.compat import apply_cpu_patches, patch_distributed_optimizer_step
from megatron_rlp.config import ParallelConfig


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(parallel: ParallelConfig, seed: int, timeout_minutes: int = 10) -> None:
    """Start the process group (if needed), megatron's TP/PP/DP groups and the RNG streams."""
    check_layout(parallel)
    prepare_megatron()
    if not dist.is_initialized():
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if torch.cuda.is_available():
            select_local_gpu()
        if "MASTER_ADDR" in os.environ:
            init_method = "env://"
        else:  # a world of one: a private file store avoids port clashes between runs
            fd, path = tempfile.mkstemp(prefix="megatron_rlp_pg_")
            os.close(fd)
            os.unlink(path)
            init_method = f"file://{path}"
        dist.init_process_group(backend(), init_method=init_method, rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    world_size = dist.get_world_size()
    model_parallel = parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by TP x PP = "
            f"{parallel.tensor_model_parallel_size} x {parallel.pipeline_model_parallel_size}; "
            "launch a multiple of TP x PP processes")
    if not parallel_state.model_parallel_is_initialized():
        vpp = None
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=vpp,
        )
    seed_everything(seed)


def select_local_gpu() -> None:
    """`cuda:LOCAL_RANK` becomes this process's device (megatron allocates on the current device)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    visible = torch.cuda.device_count()
    if local_rank >= visible:
        raise ValueError(f"LOCAL_RANK={local_rank} but this node shows {visible} CUDA device(s); "
                         f"launch at most {visible} processes per node (torchrun "
                         "--nproc-per-node) or check CUDA_VISIBLE_DEVICES")
    torch.cuda.set_device(local_rank)


def prepare_megatron() -> bool:
    """Patch megatron-core for this host: its bug fixes everywhere, the CPU shims only where there
    is no CUDA (on a GPU host megatron runs unpatched). Returns whether the CPU shims are active."""
    patch_distributed_optimizer_step()
    return apply_cpu_patches()


def check_layout(parallel: ParallelConfig) -> None:
    """Layouts megatron-core 0.16.1 cannot run with our hybrid model; fail before any work."""
    if parallel.num_layers_per_virtual_pipeline_stage is not None:
        raise ValueError(
            f"--num-layers-per-virtual-pipeline-stage="
            f"{parallel.num_layers_per_virtual_pipeline_stage}: interleaved (virtual) pipeline "
            "parallelism is not supported for hybrid Mamba models by megatron-core 0.16.1 "
            "(MambaStack asserts it off); drop the flag to use the 1F1B schedule")


def seed_everything(seed: int) -> None:
    """Same seed on every rank for init (megatron's CPU init draws full weights, then splits);
    megatron's tracker gives TP ranks their own dropout stream."""
    torch.manual_seed(seed)
    tp_random.model_parallel_cuda_manual_seed(seed)


def data_parallel_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
