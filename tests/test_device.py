"""Placement helpers and the collective door on the CPU (the GPU side: test_gpu_simulation.py)."""
import dataclasses

import pytest
import torch

from megatron_rlp import device
from megatron_rlp.inference.sampling import sample_inverse_cdf


@dataclasses.dataclass
class Batch:
    tokens: torch.Tensor
    meta: dict
    count: int = 3


def test_to_device_moves_every_tensor_in_nested_containers():
    batch = {"a": torch.ones(2), "b": [torch.zeros(1), (torch.ones(1), "x")],
             "c": Batch(torch.ones(3), {"m": torch.ones(1)})}
    moved = device.to_device(batch, torch.device("meta"))
    assert moved["a"].is_meta and moved["b"][0].is_meta and moved["b"][1][0].is_meta
    assert moved["b"][1][1] == "x"
    assert moved["c"].tokens.is_meta and moved["c"].meta["m"].is_meta and moved["c"].count == 3
    assert not batch["a"].is_meta  # the input is left alone


def test_compute_device_is_the_cpu_without_cuda():
    assert device.compute_device() == torch.device("cpu")


def test_collectives_without_a_world_return_their_input():
    t = torch.arange(3.0)
    assert device.all_reduce(t) is t
    assert device.all_reduce_values([1, 2]) == [1.0, 2.0]
    assert device.any_rank(True) and not device.any_rank(False)
    assert device.all_gather_object("x") == ["x"]
    assert device.broadcast(t, src=0) is t
    device.barrier()


def test_unknown_reduce_op_is_rejected():
    with pytest.raises(ValueError, match="'mean' is not one of"):
        device.all_reduce(torch.ones(1), "mean")


def test_inverse_cdf_sampling_follows_the_distribution_and_skips_cut_tokens():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    tokens = sample_inverse_cdf(probs, gen)
    counts = torch.bincount(tokens, minlength=5).float() / tokens.numel()
    assert counts[1] == 0 and counts[4] == 0
    assert torch.allclose(counts, probs[0], atol=0.015)
    again = sample_inverse_cdf(probs[:8], torch.Generator().manual_seed(0))
    assert torch.equal(again, tokens[:8])  # seeded: the same draws


@pytest.fixture
def world_of_one():
    from megatron_rlp.config import ParallelConfig
    from megatron_rlp.training.distributed import destroy_distributed, init_distributed

    init_distributed(ParallelConfig(), seed=3)
    yield
    destroy_distributed()


TINY = dict(num_layers=4, hybrid_override_pattern="M*M-", hidden_size=32, ffn_hidden_size=64,
            num_attention_heads=4, num_query_groups=2, mamba_num_heads=4, mamba_head_dim=8,
            mamba_state_dim=8, mamba_num_groups=2, mamba_chunk_size=8, seq_length=16)


def test_training_chunks_are_placed_on_the_compute_device(world_of_one, monkeypatch):
    """The meta device stands in for this rank's GPU: every parameter and buffer must follow."""
    from megatron_rlp.config import config_from_dict
    from megatron_rlp.train import build_model_chunks

    monkeypatch.setattr(device, "compute_device", lambda: torch.device("meta"))
    (chunk,) = build_model_chunks(config_from_dict(TINY), vocab_size=100)
    assert {t.device.type for t in list(chunk.parameters()) + list(chunk.buffers())} == {"meta"}


def test_loaded_models_are_built_on_the_device_asked_for(world_of_one):
    from megatron_rlp.config import config_from_dict
    from megatron_rlp.inference.load import build_single_process_model

    model, _ = build_single_process_model(config_from_dict(TINY), device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    model, _ = build_single_process_model(config_from_dict(TINY))  # default: compute_device()
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_first_problem_without_a_world_is_this_ranks_own():
    assert device.first_problem("") == "" and device.first_problem("disk full") == "disk full"
