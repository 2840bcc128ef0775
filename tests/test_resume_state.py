"""What a resume restores besides tensors, on every host: RNG streams and optimizer state."""
import pytest
import torch

from megatron_rlp.training import checkpoint as ckpt


class FusedAdamLike(torch.optim.Optimizer):
    """Stands in for TransformerEngine's FusedAdam: `step` lives in the param group and a
    per-param `step` in the state is an error when it loads."""

    def __init__(self, params):
        super().__init__(params, {"lr": 1e-3, "step": 0})

    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] += 1


def test_fresh_torch_adamw_gets_zero_state_before_loading():
    param = torch.nn.Parameter(torch.ones(3))
    adamw = torch.optim.AdamW([param])
    ckpt._ensure_adam_state(adamw)
    state = adamw.state[param]
    assert float(state["step"]) == 0 and torch.equal(state["exp_avg"], torch.zeros(3))


def test_fused_adam_state_is_left_to_megatron():
    param = torch.nn.Parameter(torch.ones(3))
    fused = FusedAdamLike([param])
    ckpt._ensure_adam_state(fused)
    ckpt._unshare_adam_steps(fused)
    assert param not in fused.state or "step" not in fused.state[param]


def test_rng_saved_on_a_gpu_host_restores_the_cpu_stream_on_a_cpu_host(monkeypatch):
    from megatron_rlp.training.distributed import destroy_distributed, init_distributed
    from megatron_rlp.config import ParallelConfig

    init_distributed(ParallelConfig(), seed=5)
    try:
        saved = ckpt._rng_state()
        assert "cuda" not in saved  # a CPU host has no CUDA generator to save
        expected = torch.rand(4)
        gpu_saved = dict(saved, cuda=torch.zeros(16, dtype=torch.uint8),
                         tracker={"model-parallel-rng": torch.zeros(16, dtype=torch.uint8)})
        tracker_before = ckpt.tp_random.get_cuda_rng_tracker().get_states()
        ckpt._restore_rng(gpu_saved)
        assert torch.equal(torch.rand(4), expected)
        # CUDA tracker states mean nothing to the CPU tracker: it keeps its own streams
        after = ckpt.tp_random.get_cuda_rng_tracker().get_states()
        assert after.keys() == tracker_before.keys()
        assert all(torch.equal(after[k], tracker_before[k]) for k in after)
    finally:
        destroy_distributed()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_streams_round_trip_through_a_checkpoint_state():
    from megatron_rlp.config import ParallelConfig
    from megatron_rlp.training.distributed import destroy_distributed, init_distributed

    init_distributed(ParallelConfig(), seed=5)
    try:
        saved = ckpt._rng_state()
        assert "cuda" in saved
        tracker = ckpt.tp_random.get_cuda_rng_tracker()
        expected_gpu = torch.rand(4, device="cuda")
        with tracker.fork():
            expected_tracker = torch.rand(4, device="cuda")
        ckpt._restore_rng(saved)
        assert torch.equal(torch.rand(4, device="cuda"), expected_gpu)
        with tracker.fork():
            assert torch.equal(torch.rand(4, device="cuda"), expected_tracker)
    finally:
        destroy_distributed()
