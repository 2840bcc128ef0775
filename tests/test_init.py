"""Weight init draws each matrix once, only the rows a rank keeps, and gives exactly the weights
of the previous path (megatron drew every full matrix on CPU, then `layout_invariant_init` and the
Mamba2 mixer redrew them in full from (seed, global name) streams and sliced).

Each TP/PP rank is built in this process under a "fake" process group (as `--dry-run` does), so
TP=2 rank 1 and PP=2 stage 1 are checked without launching ranks.
"""
import contextlib
import functools

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch.testing._internal.distributed.fake_pg import FakeStore

from megatron_rlp.config import config_from_dict
from megatron_rlp.models import hybrid, mamba2_layout
from megatron_rlp.training.distributed import prepare_megatron, seed_everything

SHAPE = dict(num_layers=4, hybrid_override_pattern="M*M-", hidden_size=64, ffn_hidden_size=128,
             num_attention_heads=4, num_query_groups=2, mamba_num_heads=4, mamba_head_dim=16,
             mamba_state_dim=16, mamba_num_groups=2, mamba_chunk_size=16, seq_length=32, seed=7)
VOCAB = 100
TP_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel")
# (TP, PP, global rank, bf16): rank 1 of TP=2 holds the second slice of every split; rank 1 of
# PP=2 builds layers 2-3 only, whose streams must not depend on what stage 0 builds.
LAYOUTS = [(1, 1, 0, False), (2, 1, 0, False), (2, 1, 1, False), (1, 2, 1, False),
           (2, 1, 1, True)]


@contextlib.contextmanager
def fake_rank(tp, pp, rank):
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised: an earlier test leaked it")
    prepare_megatron()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=tp * pp)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                 pipeline_model_parallel_size=pp,
                                                 create_gloo_process_groups=False)
        seed_everything(SHAPE["seed"])
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def build(tp, pp, rank, bf16=False, **kwargs):
    cfg = config_from_dict(dict(SHAPE, tensor_model_parallel_size=tp,
                                pipeline_model_parallel_size=pp, bf16=bf16))
    with fake_rank(tp, pp, rank):
        return hybrid.build_model(cfg, VOCAB, pre_process=parallel_state.is_pipeline_first_stage(),
                                  post_process=parallel_state.is_pipeline_last_stage(), **kwargs)


@pytest.fixture
def previous_path(monkeypatch):
    """Switch the builder to the previous path: megatron draws every weight itself
    (`perform_initialization=True`), and our init redraws full tensors and slices them."""
    def build_previous(*args, **kwargs):
        real = hybrid.transformer_config

        def megatron_draws_too(cfg, **kw):
            config = real(cfg, **kw)
            config.perform_initialization = True
            return config

        with monkeypatch.context() as m:
            m.setattr(hybrid, "transformer_config", megatron_draws_too)
            m.setattr(mamba2_layout, "PARTIAL_DRAWS", False)
            return build(*args, **kwargs)
    return build_previous


def tp_attrs(param):
    return {a: getattr(param, a, None) for a in TP_ATTRS}


@pytest.mark.parametrize("tp,pp,rank,bf16", LAYOUTS)
def test_weights_and_tp_attributes_equal_the_previous_path(tp, pp, rank, bf16, previous_path):
    new = dict(build(tp, pp, rank, bf16).named_parameters())
    old = dict(previous_path(tp, pp, rank, bf16).named_parameters())
    assert list(new) == list(old)
    for name, param in new.items():
        assert param.dtype == old[name].dtype, name
        assert torch.equal(param, old[name]), f"{name} differs from the previous init"
        assert tp_attrs(param) == tp_attrs(old[name]), name
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name


def _normals_drawn(monkeypatch):
    """Count the normal_ elements drawn (every init method here is nn.init.normal_)."""
    mamba2_layout._direct_draws_are_exact()  # its one-time self-check draws too
    drawn = []
    real = torch.Tensor.normal_

    def counting(self, *args, **kwargs):
        drawn.append(self.numel())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "normal_", counting)
    return drawn


def test_each_matrix_is_drawn_once_and_only_the_ranks_part(monkeypatch, previous_path):
    drawn = _normals_drawn(monkeypatch)
    model = build(2, 1, 1)
    # every normal drawn lands in this rank's parameters (conv weights are uniform, norms ones);
    # the other ranks' parts of the stream are skipped, not drawn
    expected = sum(p.numel() for name, p in model.named_parameters()
                   if p.dim() >= 2 and "conv1d" not in name)
    assert sum(drawn) == expected
    # the previous path drew each matrix in full twice (megatron; then ours), the mixer's once
    drawn.clear()
    previous_path(2, 1, 1)
    mixer = sum(p.numel() * 2 for n, p in model.named_parameters()
                if ".mixer." in n and p.dim() == 2)
    others = sum(p.numel() * 2 for n, p in model.named_parameters()
                 if ".mixer." not in n and p.dim() == 2)
    assert sum(drawn) == 2 * others + mixer


def test_build_without_init_draws_nothing_and_keeps_tp_attributes(monkeypatch):
    drawn = _normals_drawn(monkeypatch)
    bare = build(2, 1, 1, init_weights=False)
    assert drawn == []
    monkeypatch.undo()
    initialised = dict(build(2, 1, 1).named_parameters())
    for name, param in bare.named_parameters():
        assert tp_attrs(param) == tp_attrs(initialised[name]), name
        assert param.shape == initialised[name].shape, name
    mixer = bare.decoder.layers[0].mixer
    assert torch.isfinite(mixer.dt_bias).all() and torch.isfinite(mixer.A_log).all()


def test_dry_run_meta_build_still_counts_tp_sharded_params():
    with torch.device("meta"):
        model = build(2, 1, 0)
    sharded = [n for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)]
    assert "embedding.word_embeddings.weight" in sharded and "output_layer.weight" in sharded
    assert "decoder.layers.1.self_attention.linear_proj.weight" in sharded


NORMAL = functools.partial(torch.nn.init.normal_, mean=0.0, std=0.02)


@pytest.mark.parametrize("shape,ranges,cols,direct", [
    ((64, 48), [(16, 48)], None, True),                   # one rank's rows
    ((98, 64), [(16, 32), (48, 64), (80, 89), (95, 98)], None, True),  # a slice per component
    ((64, 48), [(0, 64)], (32, 48), True),                # one rank's columns, row by row
    ((64, 48), [(8, 40)], (0, 16), True),                 # rows and columns
    ((64, 48), [(0, 64)], (0, 48), True),                 # all columns: one segment
    ((64, 48), [(0, 64)], (24, 48), False),               # columns not on 16-element boundaries
    ((48, 3), [(16, 32)], None, True),                    # boundaries on multiples of 16 elements
    ((48, 3), [(5, 21)], None, False),                    # 15 elements skipped: not aligned
    ((41, 16), [(0, 20)], None, True),                    # 656 elements: the full draw ends on a block
    ((41, 3), [(0, 16)], None, False),                    # 123 elements: the full draw redraws its tail
    ((64, 4), [(0, 2)], None, False),                     # 8 elements: below normal_'s block
])
def test_draw_slice_equals_part_of_the_full_draw(shape, ranges, cols, direct, monkeypatch):
    calls = []
    real = mamba2_layout._draw_directly
    monkeypatch.setattr(mamba2_layout, "_draw_directly", lambda *a: calls.append(a) or real(*a))
    got = mamba2_layout.draw_slice(3, NORMAL, shape, ranges, cols=cols)
    full = mamba2_layout.with_cpu_seed(3, NORMAL, torch.empty(shape))
    expected = torch.cat([full[a:b] for a, b in ranges])
    if cols is not None:
        expected = expected[:, cols[0]:cols[1]]
    assert torch.equal(got, expected)
    assert bool(calls) == direct


def test_draw_slice_with_another_init_draws_in_full():
    uniform = functools.partial(torch.nn.init.uniform_, a=-1.0, b=1.0)
    got = mamba2_layout.draw_slice(3, uniform, (64, 48), [(16, 48)], cols=(0, 24))
    full = mamba2_layout.with_cpu_seed(3, uniform, torch.empty(64, 48))
    assert torch.equal(got, full[16:48, :24])


def test_draw_slice_leaves_the_global_generator_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    mamba2_layout.draw_slice(3, NORMAL, (64, 48), [(16, 48)], cols=(0, 16))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("ranges,cols,match", [
    ([(16, 8)], None, "increasing, disjoint, non-empty"),
    ([(0, 16), (8, 24)], None, "increasing, disjoint, non-empty"),
    ([(0, 65)], None, "increasing, disjoint, non-empty"),
    ([(0, 16)], (40, 50), "column range of a 2-D shape"),
])
def test_draw_slice_rejects_bad_ranges(ranges, cols, match):
    with pytest.raises(ValueError, match=match):
        mamba2_layout.draw_slice(3, NORMAL, (64, 48), ranges, cols=cols)
