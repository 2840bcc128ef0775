"""Each CPU shim does what its docstring says (checked on this CPU-only host)."""
import torch

from megatron_rlp.compat import apply_cpu_patches
from megatron_rlp.compat.cpu import CpuRNGStatesTracker, CudaToCpuMode


def test_cuda_device_requests_land_on_cpu():
    with CudaToCpuMode():
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(1, device=0).device.type == "cpu"
        assert torch.tensor([1.0]).cuda().device.type == "cpu"
        assert torch.tensor([1.0]).to("cuda").device.type == "cpu"


def test_fp32_param_type_check_sees_cuda_name():
    # clip_grads.py asserts param.grad.type() == "torch.cuda.FloatTensor" for fp32 grads.
    # (An earlier test may have applied the process-wide shims: compare with the name outside
    # this mode as it was before, not with a fixed one.)
    outside = torch.zeros(1).type()
    with CudaToCpuMode():
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(1).type() == outside  # nothing leaks outside the mode


def test_rng_tracker_fork_is_isolated_and_reproducible():
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 7)
    torch.manual_seed(0)
    outer_before = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer_before)  # default stream untouched
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(3)
    assert not torch.equal(first, second)  # the named stream advanced
    replay = CpuRNGStatesTracker()
    replay.add("model-parallel-rng", 7)
    with replay.fork("model-parallel-rng"):
        assert torch.equal(torch.rand(3), first)


def test_patches_install_cpu_versions_of_megatron_symbols():
    assert apply_cpu_patches() is True
    import megatron.core.tensor_parallel.random as tp_random

    assert isinstance(tp_random.get_cuda_rng_tracker(), CpuRNGStatesTracker)
    assert torch.cuda.current_device() == 0
    torch.cuda.synchronize()  # no-op instead of "Torch not compiled with CUDA enabled"
