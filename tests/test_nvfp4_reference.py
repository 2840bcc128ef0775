"""The plain-torch NVFP4 reference against hand-computed values, properties, and its own API rules.

Hand examples use ``amax=2688`` (S = 1, fl(1/S) = 1) or a block holding 6.0 with amax 6
(S = 448), where every fp32 step is exact, so expected values can be read off the E2M1/E4M3 grids
by hand.
"""
import math

import pytest
import torch

from megatron_rlp.kernels import nvfp4
from megatron_rlp.kernels import reference as ref

F32 = torch.float32


def q(x, **kw):
    return nvfp4.quantize(x, backend="reference", **kw)


def nibbles(data):
    return torch.stack([data & 0xF, data >> 4], dim=-1).reshape(data.shape[0], -1)


def scale_bytes(t):
    return t.scale.view(torch.uint8)


# --------------------------------------------------------------------------- hand-computed
def test_hand_block_codes_ties_and_signed_zero():
    # amax 6 -> S = 448, block scale E4M3(448) and fl(1/S)*448 == 1, so y == x exactly.
    x = torch.tensor([[0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0,
                       6.0, -0.1, -0.25, -0.3, -6.0, -5.0, -3.5, -0.0]])
    t = q(x)
    # ties: .25->0, .75->1.0, 1.25->1.0, 1.75->2, 2.5->2, 3.5->4, 5->4 (even codes); small
    # negatives keep the sign bit (0x8); -0.0 is not < 0 and stays code 0.
    assert nibbles(t.data).tolist() == [[0, 0, 2, 2, 4, 4, 6, 6, 7, 8, 8, 9, 15, 14, 14, 0]]
    assert t.data[0, 0].item() == 0x00 and t.data[0, 4].item() == (8 << 4) | 7
    assert scale_bytes(t).tolist() == [[0x7E]]                 # 448 = 1.75 * 2^8
    assert t.amax.item() == 6.0
    d = t.dequantize()
    vals = torch.tensor([[0, 0, 1, 1, 2, 2, 4, 4, 6, -0.0, -0.0, -0.5, -6, -4, -4, 0]])
    gds = torch.tensor(1.0) / torch.tensor(448.0)             # fl(1/S)
    assert torch.equal(d, (vals * 448.0) * gds)                # (value * scale) * fl(1/S)
    assert math.copysign(1, d[0, 9].item()) == -1 and math.copysign(1, d[0, 15].item()) == 1


@pytest.mark.parametrize("bamax,scale,byte", [
    (6.0, 1.0, 0x38),        # 6 * fl(1/6) rounds to exactly 1.0
    (102.0, 16.0, 0x58),     # 17.0 is a tie between 16 and 18: even mantissa -> 16
    (114.0, 20.0, 0x5A),     # 19.0 is a tie between 18 and 20: even mantissa -> 20
    (6000.0, 448.0, 0x7E),   # 1000 clamps to the E4M3 max 448
    (0.05625, 0.009765625, 0x05),  # 0.009375 = 4.8 * 2^-9 (subnormal) -> 5 * 2^-9
])
def test_hand_e4m3_block_scale(bamax, scale, byte):
    # amax override 2688 -> S = 1, so the block scale is E4M3(bamax * fl(1/6)).
    x = torch.zeros(1, 16)
    x[0, 3] = bamax
    t = q(x, amax=torch.tensor(2688.0))
    assert scale_bytes(t).item() == byte
    assert t.scale.float().item() == scale
    # the block max maps to at most 6 and dequantizes within one E2M1 step of x
    d = t.dequantize()[0, 3].item()
    assert d == min(6 * scale, round(bamax / scale * 2) / 2 * scale) or abs(d - bamax) <= scale


def test_hand_448_clamp_saturates_values_at_6():
    x = torch.zeros(1, 16)
    x[0, :2] = torch.tensor([6000.0, -3000.0])
    t = q(x, amax=torch.tensor(2688.0))
    assert nibbles(t.data)[0, :2].tolist() == [7, 15]          # 6000/448 and -3000/448 clamp to +-6
    assert t.dequantize()[0, :2].tolist() == [2688.0, -2688.0]


def test_block_scale_folds_one_sixth_into_S_first_as_te_2_14():
    # bf16 tensors with amax 3*2^k: find blocks where TE<=2.13's (bamax/6)*S and TE>=2.14's
    # bamax*(S*fl(1/6)) give different E4M3 scales; the reference must follow 2.14.
    g = torch.Generator().manual_seed(3)
    hits = 0
    for k in range(-3, 4):
        amax = 3.0 * 2.0**k
        x = (torch.rand(256, 256, generator=g) * 2 - 1) * amax
        x[0, 0] = amax
        x = x.bfloat16()
        t = q(x)
        s = torch.tensor(2688.0, dtype=F32) / torch.tensor(amax, dtype=F32)
        bamax = x.float().abs().reshape(256, 16, 16).amax(-1)
        new = (bamax * (s * torch.reciprocal(torch.tensor(6.0)))).clamp(max=448)
        old = ((bamax / 6.0) * s).clamp(max=448)
        new8, old8 = new.to(torch.float8_e4m3fn), old.to(torch.float8_e4m3fn)
        assert torch.equal(scale_bytes(t), new8.view(torch.uint8))
        hits += int((new8.view(torch.uint8) != old8.view(torch.uint8)).sum())
    assert hits > 0, "no block distinguishes the two orders: the test lost its power"


def test_global_scale_edge_cases():
    g = ref.global_scales(torch.tensor(0.0))
    assert g[:3].tolist() == [1.0, torch.tensor(1 / 6, dtype=F32).item(), 1.0]
    g = ref.global_scales(torch.tensor(1e-39))            # 2688/amax overflows -> FLT_MAX
    assert g[0].item() == torch.finfo(F32).max
    assert g[3].item() == 0.0
    assert ref.global_scales(torch.tensor(float("inf")))[3].item() == 1.0


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("block_2d", [False, True])
def test_dequantize_error_is_within_half_an_e2m1_step_of_the_block(block_2d):
    torch.manual_seed(0)
    x = torch.randn(64, 128)
    t = q(x, block_2d=block_2d)
    d = t.dequantize()
    assert d.shape == x.shape and d.dtype == F32
    per_block = t.scale.float().repeat_interleave(16, dim=1) * ref.global_scales(t.amax)[2]
    # largest E2M1 gap is 2 (between 4 and 6): error <= 1 * block scale
    assert ((d - x).abs() <= per_block * 1.0 + 1e-6).all()
    assert (d - x).abs().mean() < (0.12 if block_2d else 0.1) * x.abs().mean()


def test_2d_scales_are_one_per_16x16_tile_replicated_over_rows():
    torch.manual_seed(1)
    x = torch.randn(32, 64)
    s = q(x, block_2d=True).scale.view(torch.uint8)
    assert s.shape == (32, 4)
    assert torch.equal(s[:16], s[:1].expand(16, 4)) and torch.equal(s[16:], s[16:17].expand(16, 4))
    # W and W^T dequantize identically with 16x16 tiles
    assert torch.equal(q(x, block_2d=True).dequantize().t(), q(x.t().contiguous(),
                                                                block_2d=True).dequantize())


def test_zero_tensor_and_zero_rows():
    t = q(torch.zeros(16, 32))
    assert t.amax.item() == 0.0 and (t.data == 0).all() and (scale_bytes(t) == 0).all()
    assert (t.dequantize() == 0).all()
    x = torch.randn(4, 32)
    x[1] = 0
    d = q(x).dequantize()
    assert (d[1] == 0).all() and (d[0] != 0).any()


# --------------------------------------------------------------------------- non-finite input
def test_nan_poisons_only_its_block_when_amax_is_given():
    x = torch.randn(2, 48)
    x[1, 20] = float("nan")
    t = q(x, amax=torch.tensor(10.0))
    assert scale_bytes(t)[1, 1].item() == 0x7F and (nibbles(t.data)[1, 16:32] == 0).all()
    d = t.dequantize()
    assert d[1, 16:32].isnan().all()
    assert d[0].isfinite().all() and d[1, :16].isfinite().all() and d[1, 32:].isfinite().all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_makes_amax_nan_and_everything_nan(bad):
    x = torch.randn(16, 32)
    x[3, 5] = bad
    t = q(x)
    assert t.amax.isnan()
    assert (scale_bytes(t) == 0x7F).all() and (t.data == 0).all()
    assert t.dequantize().isnan().all()


# --------------------------------------------------------------------------- stochastic rounding
def _sr_block():
    # one row: 6.0 anchors scale 1 (amax override 2688), the rest sit between E2M1 neighbours
    return torch.tensor([[6.0, 0.3, 1.1, 2.7, 4.9, -0.7, -1.3, 3.2,
                          0.1, -5.5, 0.25, 1.75, -0.05, 2.2, 0.0, 5.0]])


def test_sr_draws_are_unbiased_and_mean_error_falls_like_one_over_sqrt_n():
    x = _sr_block()
    n = 16384
    t = q(x.expand(n, 16).contiguous(), stochastic=True, seed=7, amax=torch.tensor(2688.0))
    d = t.dequantize()
    err = []
    for m in (256, 16384):
        err.append((d[:m].mean(0) - x[0]).abs().max().item())
    # std of one draw <= step/2 = 1 -> mean error ~ 1/sqrt(n); allow 5 sigma
    assert err[1] < 5 / math.sqrt(n)
    assert err[1] < err[0] / 3                      # sqrt(16384/256) = 8


def test_sr_draws_only_the_two_neighbouring_e2m1_values():
    x = _sr_block()
    d = q(x.expand(4096, 16).contiguous(), stochastic=True, seed=1,
          amax=torch.tensor(2688.0)).dequantize()
    grid = torch.tensor([0.0, 0.5, 1, 1.5, 2, 3, 4, 6])
    a = x[0].abs()
    lo = grid[(grid[None, :] <= a[:, None]).sum(1) - 1]
    hi = grid[torch.clamp((grid[None, :] < a[:, None]).sum(1), max=7)]
    assert ((d.abs() == lo) | (d.abs() == hi)).all()
    assert ((d == 0) | (torch.sign(d) == torch.sign(x))).all()
    exact = lo == a
    assert (d[:, exact].abs() == a[exact]).all()          # representable values never move
    assert ((d[:, ~exact].abs() == hi[~exact]).any(0)).all()   # and others do go up sometimes


def test_sr_seeds_differ_and_a_fixed_seed_repeats():
    x = torch.randn(64, 256)
    a = q(x, stochastic=True, seed=11).data
    assert torch.equal(a, q(x, stochastic=True, seed=11).data)
    assert not torch.equal(a, q(x, stochastic=True, seed=12).data)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(q(x, stochastic=True, generator=g1).data,
                       q(x, stochastic=True, generator=g2).data)


def test_sr_bias_beats_round_to_nearest_on_a_constant_block():
    x = torch.full((2048, 16), 0.3)
    x[:, 0] = 6.0
    amax = torch.tensor(2688.0)
    rne = q(x, amax=amax).dequantize()[:, 1:].mean().item()
    sr = q(x, stochastic=True, seed=3, amax=amax).dequantize()[:, 1:].mean().item()
    assert abs(rne - 0.3) == pytest.approx(0.2)
    assert abs(sr - 0.3) < 0.01


def test_sr_never_gives_all_zero_gradients():
    torch.manual_seed(0)
    g = torch.randn(128, 256) * 1e-4
    g[0, 0] = 1.0                                          # one outlier sets a large global amax
    d = q(g, stochastic=True, seed=0).dequantize()
    assert (d != 0).any()
    assert ((d.reshape(-1, 16) != 0).any(1)).all()         # every block keeps its max element


def test_philox_matches_triton_constants_on_a_known_value():
    # Pinned output of Philox4x32-10 (Random123 known-answer: ctr=0, key=0 -> 0x6627e8d5 first word)
    u = ref.philox_uniform_ref(0, torch.zeros(1, dtype=torch.int64))
    r = 0x6627E8D5
    assert torch.equal(u, torch.tensor([float(r)], dtype=F32) * torch.tensor(4.6566127342e-10,
                                                                          dtype=F32))


# --------------------------------------------------------------------------- RHT
def test_rht_matrix_is_orthogonal_and_has_te_signs():
    m = nvfp4.hadamard_matrix()
    assert torch.equal(m @ m.t(), torch.eye(16))
    assert torch.equal(m[:, 0] * 4, torch.tensor(nvfp4.RHT_SIGNS, dtype=F32))


def test_rht_equals_blockwise_matmul_and_inverts():
    torch.manual_seed(0)
    x = torch.randn(8, 64)
    y = nvfp4.hadamard_transform(x)
    expect = (x.reshape(-1, 16) @ nvfp4.hadamard_matrix()).reshape(8, 64)
    torch.testing.assert_close(y, expect, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(nvfp4.inverse_hadamard_transform(y), x, atol=1e-6, rtol=1e-6)


def test_rht_of_bf16_is_rounded_to_bf16():
    torch.manual_seed(0)
    x = torch.randn(8, 64).bfloat16()
    y = nvfp4.hadamard_transform(x)
    assert y.dtype == torch.bfloat16
    exact = (x.float().reshape(-1, 16) @ nvfp4.hadamard_matrix()).reshape(8, 64)
    torch.testing.assert_close(y.float(), exact, atol=0, rtol=2**-8)


def test_quantize_with_rht_measures_amax_after_the_transform():
    x = torch.zeros(16, 16)
    x[:, 0] = 4.0                                 # RHT spreads each spike to 16 values of +-1
    t = q(x, rht=True)
    assert t.amax.item() == 1.0
    assert q(x).amax.item() == 4.0
    back = nvfp4.inverse_hadamard_transform(t.dequantize())
    torch.testing.assert_close(back, x, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- input validation
@pytest.mark.parametrize("x,kw,match", [
    (torch.zeros(16), {}, "must be 2D"),
    (torch.zeros(2, 16, 16), {}, "must be 2D"),
    (torch.zeros(4, 24), {}, "multiple of 16"),
    (torch.zeros(8, 32), {"block_2d": True}, "block_2d needs M=8"),
    (torch.zeros(4, 32, dtype=torch.int32), {}, "dtype"),
    (torch.zeros(4, 32, dtype=torch.float16), {"rht": True}, "rht=True supports"),
    (torch.zeros(4, 32), {"backend": "cuda"}, "backend='cuda' is not one of"),
    (torch.zeros(4, 32), {"stochastic": True, "seed": -1}, "seed=-1"),
])
def test_bad_inputs_are_rejected(x, kw, match):
    kw.setdefault("backend", "reference")
    with pytest.raises(ValueError, match=match):
        nvfp4.quantize(x, **kw)


def test_default_backend_on_cpu_is_reference():
    assert nvfp4._pick_backend(None, torch.device("cpu")) == "reference"
    assert nvfp4._pick_backend(None, torch.device("cuda")) == "triton"
