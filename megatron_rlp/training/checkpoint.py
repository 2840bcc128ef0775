"""Save and resume with megatron-core dist_checkpointing.

Layout under `--save`:
    iter_0000100/       one dist_checkpointing directory: model, optimizer, scheduler, RNG,
                        training state (iteration, consumed samples, phase, ...) and the state of
                        any registered extension (EMA teacher, NVFP4 switch, ...)
    latest              the newest *complete* iteration, as text

A save goes to `iter_0000100.tmp/`, is renamed into place once every rank has finished writing, and
only then is `latest` replaced (write temp file + `os.replace`), so a run killed at any moment leaves
`latest` pointing at a whole checkpoint. Tensors are loaded with torch's `weights_only` unpickler
(dist_checkpointing's default), never arbitrary objects.

Model and optimizer tensors are sharded by megatron (`sharded_state_dict`), so a checkpoint saved at
one TP/PP/DP layout loads at another.
"""
from __future__ import annotations

import os
import shutil
from typing import Dict, List, Optional, Protocol

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel import random as tp_random

LATEST_FILE = "latest"
FORMAT_VERSION = 1


class CheckpointedComponent(Protocol):
    """An extension's state that rides along in the checkpoint (e.g. the RLP EMA teacher).

    `sharded_state_dict()` returns megatron ShardedTensors (or plain values for common state);
    `load_sharded_state_dict(loaded)` receives the same structure back, filled in."""

    def sharded_state_dict(self) -> dict: ...

    def load_sharded_state_dict(self, state: dict) -> None: ...


def checkpoint_dir(save: str, iteration: int) -> str:
    return os.path.join(save, f"iter_{iteration:07d}")


def read_latest_iteration(load: str) -> Optional[int]:
    """The iteration named by `<load>/latest`, or None if the directory has no checkpoint."""
    path = os.path.join(load, LATEST_FILE)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, found {text!r}")
    iteration = int(text)
    if not os.path.isdir(checkpoint_dir(load, iteration)):
        raise ValueError(f"{path} names iteration {iteration} but "
                         f"{checkpoint_dir(load, iteration)} is missing")
    return iteration


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """Strip megatron's DDP wrapper (which has no sharded_state_dict of its own)."""
    return chunk.module if hasattr(chunk, "ddp_config") else chunk


def model_sharded_state_dict(model: List[torch.nn.Module]) -> dict:
    if len(model) == 1:
        return {"model": _unwrap(model[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(model)}


def _optimizer_metadata() -> dict:
    # The distributed optimizer's default sharding type fails on save in 0.16.1 (DESIGN.md);
    # "fully_reshardable" also lets a checkpoint move between DP sizes.
    return {"distrib_optim_sharding_type": "fully_reshardable"}


def _rng_state() -> dict:
    # Training draws randomness only from torch (CPU generator and megatron's tracker); data order,
    # RLP sampling and NVFP4 stochastic rounding are seeded from (seed, position in the run), so
    # these two are all a resume needs.
    return {
        "torch": torch.get_rng_state(),
        "tracker": tp_random.get_cuda_rng_tracker().get_states(),
    }


def _rng_sharded_object(state: Optional[dict]) -> ShardedObject:
    """RNG differs per rank: one object per (pp, tp, dp) rank, loadable only at the same layout."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    dp = parallel_state.get_data_parallel_world_size()
    offset = (parallel_state.get_pipeline_model_parallel_rank(),
              parallel_state.get_tensor_model_parallel_rank(),
              parallel_state.get_data_parallel_rank())
    return ShardedObject("rng_state", state, (pp, tp, dp), offset, replica_id=0)


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    tracker = tp_random.get_cuda_rng_tracker()
    tracker.set_states(state["tracker"])


def save_checkpoint(save: str, iteration: int, model: List[torch.nn.Module], optimizer,
                    scheduler, training_state: dict,
                    components: Optional[Dict[str, CheckpointedComponent]] = None) -> str:
    """Write `iter_NNNNNNN/` atomically and point `latest` at it. Returns the directory."""
    final_dir = checkpoint_dir(save, iteration)
    tmp_dir = final_dir + ".tmp"
    if _rank() == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)
    _barrier()

    state = model_sharded_state_dict(model)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False,
                                                      metadata=_optimizer_metadata())
    state["scheduler"] = scheduler.state_dict()
    state["training"] = dict(training_state, iteration=iteration, format_version=FORMAT_VERSION)
    state["rng_state"] = _rng_sharded_object(_rng_state())
    for name, component in (components or {}).items():
        state[f"ext_{name}"] = component.sharded_state_dict()

    dist_checkpointing.save(state, tmp_dir, validate_access_integrity=True)
    _barrier()
    if _rank() == 0:
        if os.path.exists(final_dir):  # re-saving the same iteration (e.g. after a resume)
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
        latest_tmp = os.path.join(save, LATEST_FILE + ".tmp")
        with open(latest_tmp, "w") as f:
            f.write(f"{iteration}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest_tmp, os.path.join(save, LATEST_FILE))
    _barrier()
    return final_dir


def load_checkpoint(load: str, model: List[torch.nn.Module], optimizer=None, scheduler=None,
                    components: Optional[Dict[str, CheckpointedComponent]] = None,
                    load_rng: bool = True, iteration: Optional[int] = None) -> dict:
    """Load the checkpoint named by `<load>/latest` (or `iteration`) into the given objects.

    Returns the saved training state (iteration, consumed samples, ...). `optimizer=None` loads
    weights only (fine-tuning or a new stage); RNG is restored only at the layout it was saved at.
    """
    if iteration is None:
        iteration = read_latest_iteration(load)
        if iteration is None:
            raise ValueError(f"--load {load!r}: no '{LATEST_FILE}' file, so no checkpoint to "
                             "resume; check the path or drop --load to start fresh")
    ckpt_dir = checkpoint_dir(load, iteration)

    state = model_sharded_state_dict(model)
    saved_tensors = _check_model_shapes(ckpt_dir, state)
    if optimizer is not None:
        _ensure_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True,
                                                          metadata=_optimizer_metadata())
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    if optimizer is not None and scheduler is not None:
        state["scheduler"] = common["scheduler"]
    for name, component in (components or {}).items():
        prefix = f"ext_{name}"
        if prefix not in common and not any(key.startswith(prefix) for key in saved_tensors):
            # Resuming without e.g. the EMA teacher would silently restart it from the student.
            raise ValueError(f"{ckpt_dir} has no saved state for '{name}' (keys 'ext_{name}*'); "
                             "it was saved by a different stage or version: start a new stage "
                             "with --finetune instead of resuming")
        state[f"ext_{name}"] = component.sharded_state_dict()
    same_layout = _saved_layout(common) == _current_layout()
    if load_rng and same_layout:
        state["rng_state"] = _rng_sharded_object(None)

    try:
        loaded = dist_checkpointing.load(state, ckpt_dir)
    except Exception as error:  # megatron reports shape mismatches deep in its loader
        raise ValueError(f"cannot load {ckpt_dir}: {error}. Was it saved from a model of a "
                         "different shape (layers, widths, pattern, vocab)?") from error

    for i, chunk in enumerate(model):
        key = "model" if len(model) == 1 else f"model{i}"
        _unwrap(chunk).load_state_dict(loaded[key], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
        if scheduler is not None:
            scheduler.load_state_dict(common["scheduler"])
    for name, component in (components or {}).items():
        component.load_sharded_state_dict(loaded[f"ext_{name}"])
    if "rng_state" in loaded:
        _restore_rng(loaded["rng_state"])
    return dict(common["training"])


def _check_model_shapes(ckpt_dir: str, state: dict) -> dict:
    """Compare this rank's model tensors with the checkpoint's metadata, then agree across ranks.
    Returns that metadata ({key: ShardedTensor without data}) for further checks.

    megatron reports a mismatch deep in its loader, on some ranks only (a PP stage sees only its
    layers), and the other ranks then wait in a collective until the timeout. Here every rank
    gets the first problem any rank found and raises the same one-line `ValueError`."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    problem = ""
    try:
        saved = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    except Exception as error:  # unreadable metadata: same outcome on every rank
        problem = f"cannot read {ckpt_dir}: {error}"
        saved = {}
    for value in nested_values(state):
        if problem:
            break
        if not isinstance(value, ShardedTensor):
            continue
        if value.key not in saved:
            problem = f"{value.key} is missing"
        elif tuple(saved[value.key].global_shape) != tuple(value.global_shape):
            problem = (f"{value.key} has shape {tuple(saved[value.key].global_shape)} there but "
                       f"{tuple(value.global_shape)} in this model")
    problems = [problem]
    if dist.is_initialized() and dist.get_world_size() > 1:
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p), "")
    if first.startswith("cannot read"):
        raise ValueError(first)
    if first:
        raise ValueError(f"checkpoint {ckpt_dir} does not fit this model: {first}; it was saved "
                         "from a model of a different shape (layers, widths, pattern, vocab): "
                         "load it with the same model flags")
    return saved


def _torch_optimizers(optimizer) -> list:
    """The torch optimizers inside megatron's (chained / distributed / fp32) wrappers."""
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [getattr(o, "optimizer", o) for o in chained]


def _ensure_adam_state(optimizer) -> None:
    """Give a never-stepped optimizer zero Adam state before building its load state dict.

    Without TE/Apex, megatron 0.16.1's `DistributedOptimizer.state_dict()` reads `step` from every
    param's torch state (`assert len(steps) == 1` fails on a fresh optimizer: no state at all),
    and its `_init_optimizer_states_with_dummy_values` would take an AdamW step (weight decay
    moves the weights). Zero state is what torch would create; the load overwrites all of it."""
    for inner in _torch_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param,
                                                           memory_format=torch.preserve_format)


def _unshare_adam_steps(optimizer) -> None:
    """megatron 0.16.1's `DistributedOptimizer.load_state_dict` (no TE/Apex) puts *one* `step`
    tensor into every param's state; torch's Adam increments each param's step in place, so the
    shared counter would advance once per param per iteration and bias correction would drift."""
    for inner in _torch_optimizers(optimizer):
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def _current_layout() -> tuple:
    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_data_parallel_world_size())


def _saved_layout(common: dict) -> tuple:
    return tuple(common["training"].get("layout", ()))


def training_state_layout() -> dict:
    """Recorded with every save so resume knows whether per-rank RNG can be restored."""
    return {"layout": list(_current_layout())}
