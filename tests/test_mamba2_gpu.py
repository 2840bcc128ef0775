"""The mamba_ssm fast path of the Mamba2 mixer agrees with the torch path, and every path hands
the decode cache an fp32 SSM state.

mamba_ssm's `mamba_chunk_scan_combined` returns its final state in C's dtype (bf16 in bf16 runs);
the mixer therefore takes only y from the kernel and computes the final state itself in fp32
(`ssd_final_state`). That helper is plain torch and is checked here on the CPU; the kernel
comparisons need CUDA with mamba_ssm and causal_conv1d and are marked `gpu`.
"""
import pytest
import torch
import torch.nn.functional as F

from megatron_rlp.models.mamba2 import ssd_final_state
from megatron_rlp.models.ssd import ssd_scan_chunked, ssd_scan_reference

VOCAB = 200


def _scan_inputs(length, seed=0, decay=3.0):
    g = torch.Generator().manual_seed(seed)
    b, h, p, groups, n = 2, 4, 8, 2, 16
    x = torch.randn(b, length, h, p, generator=g)
    dt = F.softplus(torch.randn(b, length, h, generator=g) - 1)
    A = -(torch.rand(h, generator=g) * decay + 0.05)
    B = torch.randn(b, length, groups, n, generator=g)
    C = torch.randn(b, length, groups, n, generator=g)
    h0 = torch.randn(b, h, p, n, generator=g)
    return x, dt, A, B, C, h0


@pytest.mark.parametrize("length", [1, 7, 100])
@pytest.mark.parametrize("with_initial_state", [False, True], ids=["zero_h0", "given_h0"])
def test_final_state_helper_matches_the_sequential_recurrence(length, with_initial_state):
    """fp32 final state == fp64 sequential recurrence (and the chunked scan's state), with and
    without an initial state; small decay so the initial state still matters at the end."""
    x, dt, A, B, C, h0 = _scan_inputs(length, decay=0.1)
    h0 = h0 if with_initial_state else None
    _, expected = ssd_scan_reference(*(t.double() for t in (x, dt, A, B, C)),
                                     initial_state=None if h0 is None else h0.double())
    got = ssd_final_state(x, dt, A, B, h0)
    assert got.dtype == torch.float32 and got.shape == (2, 4, 8, 16)
    tol = 1e-5 * float(expected.abs().max())
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=1e-5)
    _, chunked = ssd_scan_chunked(x, dt, A, B, C, 16, initial_state=h0)
    torch.testing.assert_close(got, chunked, atol=tol, rtol=1e-5)


def test_final_state_helper_is_fp32_for_bf16_inputs():
    x, dt, A, B, _, h0 = _scan_inputs(40)
    got = ssd_final_state(x.bfloat16(), dt, A, B.bfloat16(), h0)
    assert got.dtype == torch.float32
    expected = ssd_final_state(x.bfloat16().float(), dt, A, B.bfloat16().float(), h0)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)  # rounds nothing beyond the inputs


# ---------------------------------------------------------------------- CUDA + mamba_ssm


def _require_kernels():
    """Skip (naming what is missing) unless the fast path can run here."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device for the mamba_ssm / causal_conv1d kernels")
    pytest.importorskip("mamba_ssm", reason="needs mamba_ssm (pip install 'megatron-rlp[gpu]')")
    pytest.importorskip("causal_conv1d",
                        reason="needs causal_conv1d (pip install 'megatron-rlp[gpu]')")
    from megatron_rlp.models.mamba2 import _cuda_kernels

    assert _cuda_kernels() is not None, "mamba_ssm and causal_conv1d import but the kernels do not"


@pytest.fixture(scope="module")
def cuda_bf16_model():
    _require_kernels()
    from megatron_rlp.config import config_from_dict
    from megatron_rlp.models.hybrid import build_model
    from megatron_rlp.training.distributed import destroy_distributed, init_distributed

    cfg = config_from_dict(dict(
        num_layers=5, hybrid_override_pattern="M*-M*", hidden_size=128, ffn_hidden_size=256,
        num_attention_heads=4, num_query_groups=2, mamba_num_heads=8, mamba_head_dim=16,
        mamba_state_dim=16, mamba_num_groups=2, mamba_chunk_size=32, seq_length=128,
        init_method_std=0.1, seed=7, bf16=True))
    init_distributed(cfg.parallel, cfg.training.seed)
    try:
        yield build_model(cfg, VOCAB).cuda().eval()
    finally:
        destroy_distributed()


def _mixers(model):
    return [layer.mixer for layer in model.decoder.layers if hasattr(layer, "mixer")]


def _set_fast(model, fast):
    for mixer in _mixers(model):
        mixer.use_fast_kernels = fast


def _rel_err(got, want):
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


@pytest.mark.gpu
@torch.no_grad()
def test_fast_path_output_and_state_match_the_torch_path(cuda_bf16_model):
    """Same mixer, same bf16 input: kernels vs torch agree to bf16 precision; both states fp32."""
    mixer = _mixers(cuda_bf16_model)[0]
    g = torch.Generator(device="cuda").manual_seed(0)
    # 100 positions: not a multiple of the scan chunk (32).
    hidden = torch.randn(100, 2, 128, device="cuda", generator=g).to(torch.bfloat16)
    results = {}
    for fast in (True, False):
        mixer.use_fast_kernels = fast
        out, _ = mixer(hidden)
        state_out, conv, ssm = mixer.forward_with_state(hidden)
        results[fast] = out, state_out, conv, ssm
    mixer.use_fast_kernels = True
    (out_f, sout_f, conv_f, ssm_f), (out_t, sout_t, conv_t, ssm_t) = results[True], results[False]
    assert ssm_f.dtype == ssm_t.dtype == torch.float32
    assert conv_f.dtype == conv_t.dtype == torch.bfloat16
    assert torch.equal(conv_f, conv_t)  # both keep the raw last d_conv inputs
    assert _rel_err(out_f, out_t) < 2e-2
    assert _rel_err(sout_f, sout_t) < 2e-2
    assert _rel_err(ssm_f, ssm_t) < 2e-2


@pytest.mark.gpu
@torch.no_grad()
def test_fast_path_prefill_then_steps_match_the_full_forward_in_bf16(cuda_bf16_model):
    """Kernel prefill (fp32 state via ssd_final_state) then fp32 torch steps: the cache's SSM
    state stays fp32 and every next-token logit equals the kernels' full forward to bf16
    precision."""
    from megatron_rlp.inference.decode import CachedDecoder, full_logits

    _set_fast(cuda_bf16_model, True)
    decoder = CachedDecoder(cuda_bf16_model, VOCAB)
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 90), device="cuda", generator=g)
    prompt = 70  # prefill spans two scan chunks plus a partial one
    logits, cache = decoder.prefill(ids[:, :prompt], capacity=ids.shape[1])
    full = full_logits(cuda_bf16_model, ids, VOCAB)
    for t in range(prompt, ids.shape[1] + 1):
        for conv, ssm in cache.mamba.values():
            assert ssm.dtype == torch.float32
        assert _rel_err(logits[:, -1], full[:, t - 1]) < 3e-2, t
        if t < ids.shape[1]:
            logits = decoder.step(ids[:, t], cache)[:, None]
