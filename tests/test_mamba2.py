"""Pure-torch Mamba2 mixer: scan algorithms, mixer math, decoding states, TP layout and init.

Single-process tests share one gloo group of world size 1 with megatron's parallel_state at TP=1;
the TP=2 test spawns two gloo ranks of its own.
"""
from __future__ import annotations

import math
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.inference.contexts.static_context import StaticInferenceContext
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig

from megatron_rlp.models.mamba2 import Mamba2Mixer, Mamba2MixerSubmodules, packed_seq_idx
from megatron_rlp.models.mamba2_layout import (
    Mamba2Sizes,
    full_to_local,
    full_to_local_conv,
    full_to_local_in_proj,
    init_full_parameters,
    local_parameters,
    local_to_full,
    local_to_full_conv,
    local_to_full_in_proj,
)
from megatron_rlp.models.ssd import ssd_scan_chunked, ssd_scan_reference

D_MODEL = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tp1():
    """A world-size-1 gloo group with megatron's model-parallel state at TP=1, PP=1; what this
    fixture sets up it tears down, so later in-process runs start clean."""
    made_group = not torch.distributed.is_initialized()
    if made_group:
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    made_mp = not parallel_state.model_parallel_is_initialized()
    if made_mp:
        parallel_state.initialize_model_parallel(1, 1)
    yield
    if made_mp:
        parallel_state.destroy_model_parallel()
    if made_group:
        torch.distributed.destroy_process_group()


def make_config(heads=4, head_dim=8, groups=2, state=8, **overrides):
    kw = dict(num_layers=2, hidden_size=D_MODEL, num_attention_heads=4, use_cpu_initialization=True,
              add_bias_linear=False, mamba_num_heads=heads, mamba_head_dim=head_dim,
              mamba_num_groups=groups, mamba_state_dim=state)
    kw.update(overrides)
    return TransformerConfig(**kw)


def make_mixer(config=None, layer_number=1, chunk_size=8, pg_collection=None, **kw):
    return Mamba2Mixer(config or make_config(),
                       Mamba2MixerSubmodules(ColumnParallelLinear, RowParallelLinear),
                       d_model=D_MODEL, layer_number=layer_number, chunk_size=chunk_size,
                       pg_collection=pg_collection, **kw)


def randomize_small_params(mixer, seed=0):
    """D = 1 and norm.weight = 1 at init would hide bugs in how they are applied."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mixer.D.copy_(torch.randn(mixer.D.shape, generator=g))
        mixer.norm.weight.copy_(1 + 0.5 * torch.randn(mixer.norm.weight.shape, generator=g))


def scan_inputs(b, L, h, p, g, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, h, p, generator=gen)
    dt = F.softplus(torch.randn(b, L, h, generator=gen) - 2.0)  # ~0.01 .. 1
    A = -torch.exp(torch.rand(h, generator=gen) * math.log(16))  # -1 .. -16
    B = torch.randn(b, L, g, n, generator=gen)
    C = torch.randn(b, L, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    return x, dt, A, B, C, D


# ------------------------------------------------------------------------------------------------
# Scan algorithms
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk,L,groups,batch", [
    (4, 37, 2, 2),     # L not divisible by the chunk
    (8, 64, 1, 1),     # exact multiple
    (16, 50, 4, 3),    # one head per group
    (64, 100, 2, 2),
    (64, 20, 2, 1),    # L shorter than one chunk
])
def test_chunked_scan_matches_sequential_recurrence(chunk, L, groups, batch):
    x, dt, A, B, C, D = scan_inputs(batch, L, 4, 8, groups, 16)
    y_ref, s_ref = ssd_scan_reference(x, dt, A, B, C, D)
    y, s = ssd_scan_chunked(x, dt, A, B, C, chunk, D)
    assert y.shape == y_ref.shape == (batch, L, 4, 8)
    assert (y - y_ref).abs().max() <= 1e-5
    assert (s - s_ref).abs().max() <= 1e-5
    assert s_ref.abs().max() > 0.1  # the state is not trivially zero


def test_chunked_scan_continues_from_initial_state():
    x, dt, A, B, C, D = scan_inputs(2, 45, 4, 8, 2, 16, seed=1)
    y_full, s_full = ssd_scan_reference(x, dt, A, B, C, D)
    _, s_mid = ssd_scan_chunked(x[:, :19], dt[:, :19], A, B[:, :19], C[:, :19], 8, D)
    y_tail, s_end = ssd_scan_chunked(x[:, 19:], dt[:, 19:], A, B[:, 19:], C[:, 19:], 8, D,
                                     initial_state=s_mid)
    assert (y_tail - y_full[:, 19:]).abs().max() <= 1e-5
    assert (s_end - s_full).abs().max() <= 1e-5


def test_chunked_scan_gradients_match_reference():
    inputs = [t.clone().requires_grad_() for t in scan_inputs(1, 23, 4, 4, 2, 8, seed=2)]
    y, s = ssd_scan_chunked(*inputs[:5], 8, inputs[5])
    grads = torch.autograd.grad((y.sum() + s.square().sum()), inputs)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y_r, s_r = ssd_scan_reference(*ref_inputs[:5], ref_inputs[5])
    ref_grads = torch.autograd.grad((y_r.sum() + s_r.square().sum()), ref_inputs)
    for g, gr in zip(grads, ref_grads):
        assert torch.allclose(g, gr, atol=1e-4, rtol=1e-4)


def _document_ids(b, L, seed):
    """Non-decreasing document ids per row, boundaries at random places (some rows one document)."""
    gen = torch.Generator().manual_seed(seed)
    starts = (torch.rand(b, L, generator=gen) < 0.2).long()
    starts[:, 0] = 0
    return starts.cumsum(dim=1)


@pytest.mark.parametrize("documents", [False, True])
def test_chunked_scan_hand_written_backward_passes_gradcheck(documents):
    """`_ChunkedScan`'s backward against finite differences (fp64), through every input: x, dt,
    A, B, C, D and the initial state; L is not a multiple of the chunk, heads share groups."""
    b, L, h, p, g, n, chunk = 2, 11, 4, 3, 2, 3, 4
    x, dt, A, B, C, D = (t.double() for t in scan_inputs(b, L, h, p, g, n, seed=5))
    init = torch.randn(b, h, p, n, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    seq = _document_ids(b, L, seed=7) if documents else None
    if documents:
        assert seq[:, -1].max() > 0  # at least one boundary
    inputs = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, init)]

    def scan(x, dt, A, B, C, D, init):
        return ssd_scan_chunked(x, dt, A, B, C, chunk, D, initial_state=init, seq_idx=seq)

    assert torch.autograd.gradcheck(scan, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("chunk,L", [(8, 30), (16, 16), (64, 20)])
def test_chunked_scan_gradients_with_documents_and_state_match_sequential_autograd(chunk, L):
    """fp32 gradients of every input (incl. the initial state and the final state's gradient)
    equal autograd through the sequential recurrence, with packed documents."""
    x, dt, A, B, C, D = scan_inputs(2, L, 4, 8, 2, 16, seed=8)
    init = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(9))
    seq = _document_ids(2, L, seed=10)
    weights = torch.randn(2, L, 4, 8, generator=torch.Generator().manual_seed(11))

    def grads(fn):
        inputs = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, init)]
        y, s = fn(*inputs)
        return torch.autograd.grad((y * weights).sum() + s.square().sum(), inputs)

    ours = grads(lambda x, dt, A, B, C, D, init: ssd_scan_chunked(
        x, dt, A, B, C, chunk, D, initial_state=init, seq_idx=seq))
    ref = grads(lambda x, dt, A, B, C, D, init: ssd_scan_reference(
        x, dt, A, B, C, D, initial_state=init, seq_idx=seq))
    for name, g, gr in zip(("x", "dt", "A", "B", "C", "D", "init"), ours, ref):
        assert torch.allclose(g, gr, atol=1e-4, rtol=1e-4), (name, (g - gr).abs().max())
        assert gr.abs().max() > 0, name


def test_chunked_scan_with_underflowing_decays_matches_reference():
    """Heads whose decay underflows fp32 within a chunk (dt A down to -40 per step): the flushed
    decays (< 1e-26, set to 0 to keep subnormals out) change nothing visible, forward or grads."""
    x, dt, A, B, C, D = scan_inputs(1, 40, 4, 8, 2, 16, seed=12)
    A = torch.tensor([-40.0, -8.0, -1.0, -0.01])  # decays from e^-40 to ~1 per unit dt
    dt = dt * 2
    inputs = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D)]
    y, s = ssd_scan_chunked(*inputs[:5], 16, inputs[5])
    y_r, s_r = ssd_scan_reference(*inputs[:5], inputs[5])
    assert (y - y_r).abs().max() <= 1e-5 and (s - s_r).abs().max() <= 1e-5
    grads = torch.autograd.grad(y.sum() + s.sum(), inputs)
    ref_grads = torch.autograd.grad(y_r.sum() + s_r.sum(), inputs)
    for g, gr in zip(grads, ref_grads):
        assert torch.allclose(g, gr, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Mixer math
# ------------------------------------------------------------------------------------------------

def naive_mixer(m, u):
    """The mixer written out step by step from its parameters: loops over time and groups."""
    W = m.in_proj.weight
    zxbcdt = u @ W.T  # [s, b, proj]
    di, gn, h = m.d_inner_local_tp, m.ngroups_local_tp * m.d_state, m.nheads_local_tp
    z, xbc, dt = zxbcdt.split([di, di + 2 * gn, h], dim=-1)
    L, b, _ = u.shape
    w, bias = m.conv1d.weight[:, 0, :], m.conv1d.bias  # [c, K]
    K = w.shape[-1]
    conv = torch.zeros_like(xbc)
    for t in range(L):
        acc = bias.expand(b, -1).clone()
        for k in range(K):
            src = t - (K - 1) + k
            if src >= 0:
                acc = acc + w[:, k] * xbc[src]
        conv[t] = acc
    xbc = F.silu(conv)
    x, B, C = xbc.split([di, gn, gn], dim=-1)
    x = x.permute(1, 0, 2).reshape(b, L, h, m.headdim)
    B = B.permute(1, 0, 2).reshape(b, L, m.ngroups_local_tp, m.d_state)
    C = C.permute(1, 0, 2).reshape(b, L, m.ngroups_local_tp, m.d_state)
    dt = F.softplus(dt.permute(1, 0, 2) + m.dt_bias)
    y, _ = ssd_scan_reference(x, dt, -torch.exp(m.A_log), B, C, m.D)
    y = y.reshape(b, L, di).permute(1, 0, 2)
    gated = y * F.silu(z)
    gs = di // m.ngroups_local_tp
    parts = []
    for gi in range(m.ngroups_local_tp):
        part = gated[..., gi * gs:(gi + 1) * gs]
        parts.append(part / torch.sqrt(part.pow(2).mean(-1, keepdim=True) + 1e-5))
    y = torch.cat(parts, dim=-1) * m.norm.weight
    return y @ m.out_proj.weight.T


@pytest.mark.parametrize("groups,L,chunk", [(2, 21, 8), (1, 16, 4), (4, 9, 16)])
def test_mixer_forward_matches_naive_reference_mixer(tp1, groups, L, chunk):
    m = make_mixer(make_config(heads=4, groups=groups), chunk_size=chunk)
    randomize_small_params(m)
    u = torch.randn(L, 3, D_MODEL, generator=torch.Generator().manual_seed(3))
    out, bias = m(u)
    assert bias is None and out.shape == u.shape
    with torch.no_grad():
        ref = naive_mixer(m, u)
    assert (out - ref).abs().max() <= 1e-5


def test_every_parameter_receives_a_gradient(tp1):
    m = make_mixer()
    randomize_small_params(m)
    u = torch.randn(19, 2, D_MODEL, requires_grad=True)
    out, _ = m(u)
    out.square().sum().backward()
    names = {n for n, _ in m.named_parameters()}
    assert names == {"in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D",
                     "norm.weight", "out_proj.weight"}
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    assert u.grad.abs().max() > 0


def test_packed_documents_do_not_leak_state_into_each_other(tp1):
    m = make_mixer(chunk_size=4)
    randomize_small_params(m)
    lengths = [5, 1, 4, 8, 3]  # boundaries inside chunks, on chunk edges, a 1-token document
    u = torch.randn(sum(lengths), 1, D_MODEL)
    cu = torch.tensor([0, 5, 6, 10, 18], dtype=torch.int32)  # last document runs to the end
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    with torch.no_grad():
        packed, _ = m(u, packed_seq_params=params)
        separate = torch.cat([m(part)[0] for part in torch.split(u, lengths)])
        unpacked, _ = m(u)
    assert (packed - separate).abs().max() <= 1e-5
    assert (unpacked - separate).abs().max() > 1e-3  # without packing the state does leak
    assert packed_seq_idx(params, 20).tolist() == [[0] * 5 + [1] + [2] * 4 + [3] * 8 + [4] * 2]


def test_chunked_scan_with_document_ids_matches_reference_and_separate_runs():
    x, dt, A, B, C, D = scan_inputs(2, 30, 4, 8, 2, 16, seed=4)
    seq = torch.tensor([[0] * 7 + [1] * 9 + [2] * 14, [0] * 16 + [1] * 1 + [2] * 13])
    init = torch.randn(2, 4, 8, 16)
    y_ref, s_ref = ssd_scan_reference(x, dt, A, B, C, D, initial_state=init, seq_idx=seq)
    y, s = ssd_scan_chunked(x, dt, A, B, C, 8, D, initial_state=init, seq_idx=seq)
    assert (y - y_ref).abs().max() <= 1e-5 and (s - s_ref).abs().max() <= 1e-5
    # batch row 0 document by document: initial state feeds only the first document
    parts, state = [], init[:1]
    for start, stop in ((0, 7), (7, 16), (16, 30)):
        sl = slice(start, stop)
        y_d, state = ssd_scan_reference(x[:1, sl], dt[:1, sl], A, B[:1, sl], C[:1, sl], D,
                                        initial_state=state if start == 0 else None)
        parts.append(y_d)
    assert (torch.cat(parts, dim=1) - y[:1]).abs().max() <= 1e-5
    assert (state - s[:1]).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------------
# Decoding with states
# ------------------------------------------------------------------------------------------------

def test_step_by_step_decoding_matches_full_forward(tp1):
    m = make_mixer(chunk_size=4)
    randomize_small_params(m)
    u = torch.randn(11, 2, D_MODEL)
    with torch.no_grad():
        full, _ = m(u)
        conv, ssm = m.allocate_inference_state(2)
        assert conv.shape == (2, m.conv_dim_local, 4) and ssm.shape == (2, 4, 8, 8)
        outs = []
        for t in range(u.shape[0]):
            tok = u[t] if t % 2 else u[t:t + 1]  # both [b, d] and [1, b, d] inputs
            o, conv, ssm = m.step(tok, conv, ssm)
            assert o.shape == tok.shape
            outs.append(o.reshape(2, D_MODEL))
    assert (torch.stack(outs) - full).abs().max() <= 1e-5


def test_prefill_state_then_steps_match_full_forward(tp1):
    m = make_mixer(chunk_size=4)
    randomize_small_params(m)
    u = torch.randn(14, 3, D_MODEL)
    with torch.no_grad():
        full, _ = m(u)
        pre, conv, ssm = m.forward_with_state(u[:9])
        conv_before, ssm_before = conv.clone(), ssm.clone()
        outs = [pre]
        for t in range(9, 14):
            o, conv_next, ssm_next = m.step(u[t:t + 1], conv, ssm)
            if t == 9:  # states are returned fresh; the caller's copies are untouched
                assert torch.equal(conv, conv_before) and torch.equal(ssm, ssm_before)
            conv, ssm = conv_next, ssm_next
            outs.append(o)
    assert (torch.cat(outs) - full).abs().max() <= 1e-5


def test_chunked_prefill_continues_from_states(tp1):
    m = make_mixer(chunk_size=8)
    randomize_small_params(m)
    u = torch.randn(20, 2, D_MODEL)
    with torch.no_grad():
        full, _ = m(u)
        a, conv, ssm = m.forward_with_state(u[:2])  # shorter than d_conv: conv state zero-padded
        b_, conv, ssm = m.forward_with_state(u[2:13], conv, ssm)
        c, conv, ssm = m.forward_with_state(u[13:], conv, ssm)
        _, conv_full, ssm_full = m.forward_with_state(u)
    assert (torch.cat([a, b_, c]) - full).abs().max() <= 1e-5
    assert torch.allclose(conv, conv_full) and (ssm - ssm_full).abs().max() <= 1e-5


def test_static_inference_context_prefill_and_decode_match_forward(tp1):
    m = make_mixer(chunk_size=4, layer_number=2)
    randomize_small_params(m)
    m.eval()
    u = torch.randn(10, 2, D_MODEL)
    ctx = StaticInferenceContext(max_batch_size=2, max_sequence_length=16)
    with torch.no_grad():
        full, _ = m(u)
        outs = [m(u[:6], inference_context=ctx)[0]]
        ctx.sequence_len_offset += 6
        for t in range(6, 10):
            outs.append(m(u[t:t + 1], inference_context=ctx)[0])
            ctx.sequence_len_offset += 1
        assert 2 in ctx.key_value_memory_dict
        ctx.sequence_len_offset = 0  # a new prompt resets the cached states
        again, _ = m(u[:6], inference_context=ctx)
    assert (torch.cat(outs) - full).abs().max() <= 1e-5
    assert torch.allclose(again, outs[0], atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

class _FakeTP:
    def __init__(self, size):
        self._size = size

    def size(self):
        return self._size

    def rank(self):
        return 0


@pytest.mark.parametrize("cfg,tp,chunk,message", [
    (dict(heads=6, groups=2), 4, 8, r"mamba_num_heads=6 is not divisible by tensor_model_parallel_size=4"),
    (dict(heads=8, groups=1), 2, 8, r"mamba_num_groups=1 is not divisible by tensor_model_parallel_size=2"),
    (dict(heads=6, groups=4), 1, 8, r"mamba_num_heads=6 is not divisible by mamba_num_groups=4"),
    (dict(heads=4, groups=2), 1, 48, r"chunk_size=48 must be a power of two"),
    (dict(heads=4, groups=2), 1, 0, r"chunk_size=0 must be a power of two"),
    (dict(heads=None, groups=2), 1, 8, r"mamba_num_heads=None.*--mamba-num-heads"),
    (dict(heads=4, groups=2, state=0), 1, 8, r"mamba_state_dim=0.*--mamba-state-dim"),
])
def test_bad_mixer_configuration_is_rejected(tp1, cfg, tp, chunk, message):
    pg = SimpleNamespace(tp=_FakeTP(tp))
    with pytest.raises(ValueError, match=message):
        make_mixer(make_config(**cfg), chunk_size=chunk, pg_collection=pg)


def test_mamba_chunk_size_and_conv_kernel_flags_reach_the_mixer(tp1):
    """MambaLayer builds the mixer without `chunk_size` or `d_conv`: they must come from
    --mamba-chunk-size / --mamba-conv-kernel (via the builder's TransformerConfig)."""
    from megatron_rlp.config import config_from_dict
    from megatron_rlp.models.hybrid import transformer_config

    cfg = config_from_dict(dict(num_layers=2, hybrid_override_pattern="M-", hidden_size=D_MODEL,
                                ffn_hidden_size=64, num_attention_heads=4, mamba_num_heads=4,
                                mamba_head_dim=8, mamba_num_groups=2, mamba_state_dim=8,
                                mamba_chunk_size=32, mamba_conv_kernel=3))
    m = Mamba2Mixer(transformer_config(cfg),
                    Mamba2MixerSubmodules(ColumnParallelLinear, RowParallelLinear),
                    d_model=D_MODEL, layer_number=1)
    assert m.chunk_size == 32
    assert m.d_conv == 3 and m.conv1d.weight.shape[-1] == 3
    assert make_mixer(chunk_size=8).chunk_size == 8  # an explicit argument still wins


# ------------------------------------------------------------------------------------------------
# TP layout and initialisation
# ------------------------------------------------------------------------------------------------

SIZES = Mamba2Sizes(nheads=8, head_dim=3, ngroups=4, d_state=5)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_split_and_merge_round_trip(tp):
    w = torch.randn(sum(SIZES.in_proj_sections()), 7)
    shards = [full_to_local_in_proj(w, r, tp, SIZES) for r in range(tp)]
    assert torch.equal(local_to_full_in_proj(shards, SIZES), w)
    conv = torch.randn(sum(SIZES.conv_sections()), 1, 4)
    assert torch.equal(local_to_full_conv([full_to_local_conv(conv, r, tp, SIZES) for r in range(tp)],
                                          SIZES), conv)
    out = torch.randn(6, SIZES.d_inner)
    assert torch.equal(local_to_full([full_to_local(out, r, tp, [SIZES.d_inner], 1) for r in range(tp)],
                                     [SIZES.d_inner], 1), out)


def test_tp_rank_slice_holds_its_part_of_every_component():
    rows = torch.arange(sum(SIZES.in_proj_sections()))[:, None].float()
    di, gn, h = 24, 20, 8
    local = full_to_local_in_proj(rows, 1, 2, SIZES)[:, 0].long().tolist()
    expected = (list(range(12, 24)) + list(range(di + 12, di + 24))           # z_1, x_1
                + list(range(2 * di + 10, 2 * di + 20))                        # B_1 (groups 2, 3)
                + list(range(2 * di + gn + 10, 2 * di + 2 * gn))               # C_1
                + list(range(2 * di + 2 * gn + 4, 2 * di + 2 * gn + h)))       # dt_1 (heads 4..7)
    assert local == expected


def test_init_depends_only_on_seed_and_global_layer(tp1):
    cfg = make_config()
    cfg.init_seed = 7
    a = make_mixer(cfg, layer_number=3)
    torch.manual_seed(999)  # unrelated draws between builds must not matter
    torch.randn(1000)
    b = make_mixer(cfg, layer_number=3)
    c = make_mixer(cfg, layer_number=4)
    full = init_full_parameters(a.sizes, D_MODEL, seed=7, layer_number=3, init_method=cfg.init_method,
                                output_layer_init_method=cfg.output_layer_init_method)
    for name, p in a.named_parameters():
        assert torch.equal(p, b.state_dict()[name]), name
        assert torch.equal(p.detach(), full[name].to(p.dtype)), name
    assert not torch.equal(a.in_proj.weight, c.in_proj.weight)
    assert not torch.equal(a.dt_bias, c.dt_bias)
    cfg.init_seed = 8
    assert not torch.equal(a.in_proj.weight, make_mixer(cfg, layer_number=3).in_proj.weight)
    # distributions follow megatron: dt = softplus(dt_bias) in [dt_min, dt_max], A in [1, 16]
    dt = F.softplus(a.dt_bias)
    assert dt.min() >= 1e-3 - 1e-7 and dt.max() <= 0.1 + 1e-7
    A = torch.exp(a.A_log)
    assert A.min() >= 1 and A.max() <= 16
    assert abs(a.in_proj.weight.std().item() - cfg.init_method_std) < 0.005


def test_sharded_state_dict_splits_in_proj_and_conv_like_megatron(tp1):
    m = make_mixer()
    sd = m.sharded_state_dict(prefix="mixer.")
    assert isinstance(sd["mixer.in_proj.weight"], ShardedTensorFactory)
    pieces = {t.key: t for t in sd["mixer.in_proj.weight"].build()}
    assert {k: tuple(t.global_shape) for k, t in pieces.items()} == {
        "mixer.in_proj.weight.z": (32, D_MODEL), "mixer.in_proj.weight.x": (32, D_MODEL),
        "mixer.in_proj.weight.B": (16, D_MODEL), "mixer.in_proj.weight.C": (16, D_MODEL),
        "mixer.in_proj.weight.dt": (4, D_MODEL)}
    assert torch.equal(pieces["mixer.in_proj.weight.B"].data, m.in_proj.weight[64:80])
    conv = {t.key: tuple(t.global_shape) for t in sd["mixer.conv1d.weight"].build()}
    assert conv == {"mixer.conv1d.weight.x": (32, 1, 4), "mixer.conv1d.weight.B": (16, 1, 4),
                    "mixer.conv1d.weight.C": (16, 1, 4)}
    assert {t.key for t in sd["mixer.conv1d.bias"].build()} == {
        "mixer.conv1d.bias.x", "mixer.conv1d.bias.B", "mixer.conv1d.bias.C"}
    for key in ("A_log", "dt_bias", "D", "norm.weight", "out_proj.weight"):
        assert isinstance(sd[f"mixer.{key}"], ShardedTensor), key


# ------------------------------------------------------------------------------------------------
# Real TP=2 on two gloo ranks
# ------------------------------------------------------------------------------------------------

def _tp2_worker(rank, port, out_dir):
    from megatron_rlp.compat import apply_cpu_patches

    apply_cpu_patches()  # dist_checkpointing's save calls torch.cuda.synchronize()
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=2)
    parallel_state.initialize_model_parallel(2, 1)
    from megatron.core import dist_checkpointing
    from megatron.core.process_groups_config import ProcessGroupCollection

    cfg = make_config(heads=4, groups=2, tensor_model_parallel_size=2)
    cfg.init_seed = 5
    m = make_mixer(cfg, layer_number=2, pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    u = torch.randn(13, 2, D_MODEL, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        out, _ = m(u)
        _, conv, ssm = m.forward_with_state(u)
    torch.save({"params": {k: v.detach().clone() for k, v in m.named_parameters()},
                "out": out, "conv": conv, "ssm": ssm}, os.path.join(out_dir, f"rank{rank}.pt"))
    # Save other (known) values through dist_checkpointing to test the per-component split.
    other = local_parameters(init_full_parameters(m.sizes, D_MODEL, seed=99, layer_number=2),
                             rank, 2, m.sizes)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(other[name])
    os.makedirs(os.path.join(out_dir, "ckpt"), exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(m.sharded_state_dict(prefix="mixer."), os.path.join(out_dir, "ckpt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_tp2_matches_tp1_and_checkpoint_reshards_to_tp1(tp1, tmp_path):
    torch.multiprocessing.spawn(_tp2_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    cfg = make_config(heads=4, groups=2)
    cfg.init_seed = 5
    m = make_mixer(cfg, layer_number=2)
    sizes = m.sizes
    merge = {
        "in_proj.weight": lambda a, b: local_to_full_in_proj([a, b], sizes),
        "conv1d.weight": lambda a, b: local_to_full_conv([a, b], sizes),
        "conv1d.bias": lambda a, b: local_to_full_conv([a, b], sizes),
        "out_proj.weight": lambda a, b: torch.cat([a, b], dim=1),
    }
    for name, p in m.named_parameters():  # identical init at TP=1 and TP=2
        merged = merge.get(name, lambda a, b: torch.cat([a, b]))(r0["params"][name], r1["params"][name])
        assert torch.equal(merged, p.detach()), name

    u = torch.randn(13, 2, D_MODEL, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        out, _ = m(u)
        _, conv, ssm = m.forward_with_state(u)
    assert torch.allclose(r0["out"], r1["out"])  # row-parallel out_proj all-reduces
    assert (r0["out"] - out).abs().max() <= 1e-5
    assert (torch.cat([r0["ssm"], r1["ssm"]], dim=1) - ssm).abs().max() <= 1e-5
    assert torch.equal(local_to_full_conv([r0["conv"].transpose(0, 1), r1["conv"].transpose(0, 1)],
                                          sizes).transpose(0, 1), conv)

    from megatron.core import dist_checkpointing
    loaded = dist_checkpointing.load(m.sharded_state_dict(prefix="mixer."), str(tmp_path / "ckpt"))
    expected = init_full_parameters(sizes, D_MODEL, seed=99, layer_number=2)
    for name, _ in m.named_parameters():
        assert torch.equal(loaded[f"mixer.{name}"], expected[name]), name
