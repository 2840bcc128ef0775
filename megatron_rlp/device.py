"""Which device a tensor lives on, and the project's one door to `torch.distributed` collectives.

Placement rules (Megatron-LM's `get_model` does the same after CPU initialisation):
    model chunks, the RLP teacher, loaded models   -> `compute_device()` right after they are built
    batches                                         -> `to_device(batch)` in the step that uses them
    tensors entering a collective                   -> the group's device (`group_device(group)`)

`compute_device()` is `cuda:<LOCAL_RANK>` (the device `init_distributed` selected) when CUDA is
present and the CPU otherwise. nccl accepts CUDA tensors only ("No backend type associated with
device type cpu"), gloo CPU tensors only, so every collective of this project goes through the
functions below, which put the tensor on its group's device first; `tests/test_device.py` checks
that no other module calls a `torch.distributed` collective. (megatron-core's own collectives act
on buffers it places itself on `torch.cuda.current_device()`; those are right once the model is.)

All functions are safe without an initialised process group (a world of one): they return their
input unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional

import torch
import torch.distributed as dist

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def compute_device() -> torch.device:
    """This process's accelerator (set by `init_distributed` from LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(obj: Any, device: Optional[torch.device] = None, non_blocking: bool = True) -> Any:
    """`obj` with every tensor inside (dicts, lists, tuples, dataclasses) moved to `device`
    (default `compute_device()`). Non-tensor leaves are returned as they are."""
    device = compute_device() if device is None else device
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=non_blocking and device.type == "cuda")
    if isinstance(obj, dict):
        return type(obj)((k, to_device(v, device, non_blocking)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device,
                                                             non_blocking)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (the whole module is placed at once)."""
    return next(model.parameters()).device


# ------------------------------------------------------------------------ which rank speaks
def is_rank_zero() -> bool:
    """Global rank 0 (or a world of one): prints a run's one-off notes and owns its --save files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def is_logging_rank() -> bool:
    """The rank that holds the loss and writes the metrics: the last pipeline stage's first TP
    and DP rank (rank 0 before megatron's groups exist)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return is_rank_zero()
    return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)


# ------------------------------------------------------------------------ collectives
def is_distributed(group=None) -> bool:
    """True when a collective over `group` would talk to another process."""
    return dist.is_initialized() and dist.get_world_size(group) > 1


def group_device(group=None) -> torch.device:
    """The device a group's backend accepts: CUDA for nccl (and torch's "cuda:fake" test backend,
    which rejects CPU tensors the same way), the CPU for gloo."""
    if not dist.is_initialized():
        return compute_device()
    config = str(dist.get_backend_config(group))  # e.g. "nccl", "cuda:nccl,cpu:gloo", "gloo"
    if "nccl" in config or config.startswith("cuda:"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """The reduction of `tensor` over `group`, returned on the group's device (the input is not
    modified unless it already lives there). `op` is "sum", "max" or "min"."""
    if op not in _REDUCE_OPS:
        raise ValueError(f"all_reduce op {op!r} is not one of {sorted(_REDUCE_OPS)}")
    if not is_distributed(group):
        return tensor
    on_group = tensor.to(group_device(group))
    dist.all_reduce(on_group, op=_REDUCE_OPS[op], group=group)
    return on_group


def all_reduce_values(values: List[float], op: str = "sum", group=None,
                      dtype: torch.dtype = torch.float64) -> List[float]:
    """Python numbers reduced over `group`; the tensor is created on the group's device directly
    (no host-to-device copy) and read back once."""
    if not is_distributed(group):
        return [float(v) for v in values]
    tensor = from_host([float(v) for v in values], dtype, group_device(group))
    return host_list(all_reduce(tensor, op, group))


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank if `flag` is True on any rank of `group`."""
    return bool(all_reduce_values([1.0 if flag else 0.0], "max", group)[0])


def broadcast(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """`tensor` from global rank `src` on every rank of `group`, on the group's device, copied back
    into `tensor` so callers may keep using their own (e.g. CPU) buffer."""
    if not is_distributed(group):
        return tensor
    on_group = tensor.to(group_device(group))
    dist.broadcast(on_group, src, group=group)
    if on_group is not tensor:
        tensor.copy_(on_group)
    return tensor


def all_gather_object(obj: Any, group=None) -> list:
    """One picklable object per rank of `group` (torch serialises through the group's device).
    Used for small control messages only (error strings), never for checkpoint payloads."""
    if not is_distributed(group):
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def first_problem(problem: str, group=None) -> str:
    """The first non-empty message any rank of `group` passed ("" if none), on every rank, so
    that all ranks raise the same one-line error together and none waits in a collective."""
    return next((p for p in all_gather_object(problem, group) if p), "")


def barrier(group=None) -> None:
    if is_distributed(group):
        # nccl's barrier needs to know the device; torch infers it from the current device.
        dist.barrier(group=group)


def from_host(values: List[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The one place host numbers become a tensor for a collective (created on `device`)."""
    return torch.tensor(values, dtype=dtype, device=device)


def host_list(tensor: torch.Tensor) -> list:
    """The one place reduced values come back to the host (a device sync on GPU)."""
    return tensor.tolist()
