"""Shims that let megatron-core 0.16.1 train on a CPU with the gloo backend.

megatron-core assumes CUDA in a handful of places that have nothing to do with the math: RNG
bookkeeping, buffer placement, synchronisation and a few type checks. Each function below patches one
of those places and names the upstream code it stands in for. `apply_cpu_patches()` applies them all,
once, and only when CUDA is unavailable: on a GPU machine megatron runs unpatched.

The patches are written against megatron-core 0.16.1 (the pin in setup.py). If an upgrade moves the
patched symbol, the patch raises instead of silently doing nothing.
"""
from __future__ import annotations

import contextlib
import importlib
import os

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
}


def _require(module_name: str, attr: str):
    module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise RuntimeError(
            f"megatron-rlp CPU shim: {module_name}.{attr} not found; these shims target "
            "megatron-core==0.16.1 (pip install megatron-core==0.16.1)"
        )
    return module


def _is_cuda_device(device) -> bool:
    if isinstance(device, int):
        return True  # an int device is a CUDA ordinal; there is no CUDA here
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class CudaToCpuMode(TorchFunctionMode):
    """Routes tensors that megatron asks to put on CUDA to the CPU.

    Stands in for hard-coded `device="cuda"` / `device=torch.cuda.current_device()` in
    `optimizer/optimizer.py`, `optimizer/clip_grads.py`, `optimizer/grad_scaler.py`,
    `pipeline_parallel/schedules.py`, `transformer/utils.py` (causal mask) and
    `distributed/param_and_grad_buffer.py` (~175 call sites in all: patching each would be a fork).
    It also answers `Tensor.type()` with the CUDA type name, because `clip_grads.py` and
    `distrib_optimizer.py` assert `param.type() == "torch.cuda.FloatTensor"` to mean "fp32 param".
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        return func(*args, **kwargs)


def patch_cuda_device_queries() -> None:
    """`torch.cuda.current_device()` / `synchronize()` are called at buffer creation, in DDP, p2p
    communication and `dist_checkpointing/strategies/filesystem_async.py`. Without CUDA they raise;
    we answer device 0 (mapped to the CPU by `CudaToCpuMode`) and make synchronisation a no-op."""
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.device_count = lambda: 0


def patch_tensor_parallel_backward() -> None:
    """Run the backward of megatron's tensor-parallel autograd Functions under `CudaToCpuMode`.

    A mode is popped while its own handler runs, and `torch.autograd.backward` dispatches to the
    mode, so the whole backward pass runs without it. The sequence-parallel backward paths in
    `tensor_parallel/layers.py` (`LinearWithGradAccumulationAndAsyncCommunication`) and
    `tensor_parallel/mappings.py` (gather / reduce-scatter) allocate their communication buffers
    with `device=torch.cuda.current_device()` there, which would ask for a real accelerator."""
    for module_name in ("megatron.core.tensor_parallel.layers",
                        "megatron.core.tensor_parallel.mappings"):
        module = importlib.import_module(module_name)
        for obj in list(vars(module).values()):
            if not (isinstance(obj, type) and issubclass(obj, torch.autograd.Function)
                    and "backward" in vars(obj)
                    and obj.__module__ == module_name):
                continue
            original = vars(obj)["backward"]
            original = original.__func__ if isinstance(original, staticmethod) else original
            if getattr(original, "_megatron_rlp_patched", False):
                continue

            def backward(ctx, *grads, _original=original):
                with CudaToCpuMode():
                    return _original(ctx, *grads)

            backward._megatron_rlp_patched = True
            obj.backward = staticmethod(backward)


class CpuRNGStatesTracker:
    """Named RNG streams on the CPU generator, with the interface of megatron's
    `tensor_parallel.random.CudaRNGStatesTracker` (add / fork / get_states / set_states / reset).

    Megatron forks the tracker around TP-layer init and local attention dropout even when dropout is
    0, and its tracker stores `torch.cuda.get_rng_state()`."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()
        self._is_initialized = False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} already registered")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already registered")
        self._is_initialized = True
        self.seeds_.add(seed)
        generator = torch.Generator().manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise ValueError(f"RNG state {name!r} has not been added")
        outer_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)


def patch_rng_tracker() -> None:
    """Replace `tensor_parallel.random._CUDA_RNG_STATE_TRACKER` and
    `model_parallel_cuda_manual_seed` (which calls `torch.cuda.manual_seed`) with CPU versions.
    Seeds follow upstream: data-parallel stream = seed, TP stream = seed + 2718 + tp_rank."""
    random_mod = _require("megatron.core.tensor_parallel.random", "model_parallel_cuda_manual_seed")
    tracker = CpuRNGStatesTracker()
    random_mod._CUDA_RNG_STATE_TRACKER = tracker
    random_mod._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    def cpu_model_parallel_manual_seed(seed, *args, tp_rank=None, ep_rank=None, etp_rank=None,
                                       **kwargs):
        from megatron.core import parallel_state

        if tp_rank is None:
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
        torch.manual_seed(seed)
        tracker.reset()
        tracker.add(random_mod._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
        tracker.add(random_mod._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
        tracker.add(random_mod._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)

    random_mod.model_parallel_cuda_manual_seed = cpu_model_parallel_manual_seed
    tp_pkg = importlib.import_module("megatron.core.tensor_parallel")
    tp_pkg.model_parallel_cuda_manual_seed = cpu_model_parallel_manual_seed


def patch_torch_compile() -> None:
    """megatron's squared-ReLU and a few fused helpers are wrapped in `torch.compile` (`jit_fuser`);
    dynamo on CPU adds seconds of compile per process for no gain at our sizes."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def apply_cpu_patches(force: bool = False) -> bool:
    """Apply every CPU shim once. Returns True if the patches are (now) active.

    A no-op when CUDA is available unless `force` (tests use it to exercise the shims on any host).
    """
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    patch_torch_compile()
    patch_cuda_device_queries()
    patch_rng_tracker()
    patch_tensor_parallel_backward()
    mode = CudaToCpuMode()
    mode.__enter__()  # active for the life of the process: megatron allocates lazily, anywhere
    _APPLIED = True
    return True


def cpu_patches_active() -> bool:
    return _APPLIED
