"""Triton NVFP4 kernels == the torch reference, bit for bit (nibbles, sign of zero, scales, amax).

On a CPU these run under the Triton interpreter: TRITON_INTERPRET must be set before the kernels
module is decorated, so this file sets it (only when CUDA is absent) before anything imports
``megatron_rlp.kernels.triton_nvfp4``. Note it then stays set for the rest of the pytest process.
With CUDA the same tests run compiled (``pytest -m gpu`` adds the large-shape ones).
"""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from megatron_rlp.kernels import nvfp4  # noqa: E402
from megatron_rlp.kernels import triton_nvfp4  # noqa: E402

# The interpreter evaluates in numpy, which warns on IEEE overflow (x * FLT_MAX -> inf, then clamped
# to +-6 as the spec wants) and on all-NaN max reductions (its tl.max skips NaN, which is why the
# kernels flag non-finite blocks explicitly); those warnings are expected, not errors.
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")]

DEV = "cuda" if torch.cuda.is_available() else "cpu"
MODES = {
    "1d": {},
    "1d_sr": {"stochastic": True, "seed": 1234567},
    "2d": {"block_2d": True},
    "rht": {"rht": True},
    "rht_sr": {"rht": True, "stochastic": True, "seed": 2**40 + 17},
}


def bits(t):
    """fp32 bit patterns, every NaN mapped to one pattern (NaN payloads carry no meaning)."""
    t = t.float().reshape(-1)
    return torch.where(t.isnan(), torch.full_like(t, float("nan")), t).view(torch.int32)


def assert_same(x, amax=None, **kw):
    a = nvfp4.quantize(x, backend="reference", amax=amax, **kw)
    b = nvfp4.quantize(x, backend="triton", amax=amax, **kw)
    assert torch.equal(a.data, b.data), f"nibbles differ at {(a.data != b.data).nonzero()[:5]}"
    assert torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8)), "scale bytes differ"
    assert torch.equal(bits(a.amax), bits(b.amax)), (a.amax, b.amax)
    da, db = a.dequantize(backend="reference"), b.dequantize(backend="triton")
    assert torch.equal(bits(da), bits(db)), "dequantize differs"
    return a


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs():
    g = _gen(0)
    cases = {
        "normal_f32": torch.randn(96, 320, generator=g),
        "normal_bf16": (torch.randn(96, 320, generator=g) * 5).bfloat16(),
        "uniform_f16": (torch.rand(64, 256, generator=g) * 8 - 4).half(),
        "heavy_tailed": torch.distributions.StudentT(1.5).sample((64, 256)).float(),
        "amax_3x2k_bf16": None,
        "zero_rows": torch.randn(48, 128, generator=g),
        "all_zero": torch.zeros(32, 64),
        "huge": torch.randn(32, 128, generator=g) * 1e30,
        "tiny_amax_below_1e-35": torch.randn(32, 128, generator=g) * 1e-37,
        "subnormal_bf16": (torch.randn(32, 64, generator=g) * 1e-39).bfloat16(),
        "mixed_magnitudes": torch.randn(64, 128, generator=g)
        * torch.logspace(-30, 30, 64).unsqueeze(1),
    }
    x = (torch.rand(128, 256, generator=g) * 2 - 1) * 48.0
    x[5, 7] = 48.0                                   # amax 3 * 2^4, bf16-exact
    cases["amax_3x2k_bf16"] = x.bfloat16()
    cases["zero_rows"][[0, 17, 47]] = 0
    return cases


INPUTS = _inputs()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(INPUTS))
def test_triton_matches_reference_bitwise(name, mode):
    x = INPUTS[name]
    kw = MODES[mode]
    if kw.get("rht") and x.dtype == torch.float16:     # RHT takes fp32/bf16 only, by design
        for backend in ("reference", "triton"):
            with pytest.raises(ValueError, match="rht=True supports float32 and bfloat16"):
                nvfp4.quantize(x.to(DEV), backend=backend, **kw)
        return
    assert_same(x.to(DEV), **kw)


@pytest.mark.parametrize("mode", ["1d", "2d", "1d_sr"])
def test_triton_matches_reference_at_e2m1_ties(mode):
    # amax override 2688 and a 6.0 in each block -> y == x: every midpoint tie is hit exactly
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    row = torch.cat([ties, -ties]).reshape(1, 16)
    x = row.repeat(32, 4)
    x[:, ::16] = 6.0
    a = assert_same(x.to(DEV), amax=torch.tensor(2688.0), **MODES[mode])
    if mode != "1d_sr":
        d = a.dequantize()[0, :16].cpu()
        assert d.tolist() == [6, 1, 1, 2, 2, 4, 4, 6, -0.0, -1, -1, -2, -2, -4, -4, -6]


def test_triton_matches_reference_on_transposed_strided_view():
    x = (torch.randn(256, 64, generator=_gen(1)) * 2).bfloat16().to(DEV)
    for kw in (MODES["rht"], MODES["rht_sr"], MODES["1d"]):
        a = assert_same(x.t(), **kw)
        b = nvfp4.quantize(x.t().contiguous(), backend="triton", **kw)
        assert torch.equal(a.data, b.data)


def test_triton_matches_reference_on_many_blocks_and_ragged_tiles():
    g = _gen(2)
    for shape in [(16, 16), (1, 48), (200, 1040), (512, 2048)]:
        x = torch.randn(*shape, generator=g).to(DEV)
        assert_same(x)
    assert_same(torch.randn(208, 528, generator=g).to(DEV), block_2d=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_triton_matches_reference_on_non_finite_input(bad):
    x = torch.randn(32, 64, generator=_gen(3))
    x[9, 40] = bad
    for kw in (MODES["1d"], MODES["2d"], MODES["rht"]):
        a = assert_same(x.to(DEV), **kw)
        assert a.amax.isnan() and a.dequantize().isnan().all()
        a = assert_same(x.to(DEV), amax=torch.tensor(4.0), **kw)
        assert a.dequantize().isnan().any() and not a.dequantize().isnan().all()


@pytest.mark.parametrize("amax", [0.0, 1e-39, 1e-30, 3.0 * 2.0 ** -120, 7.0, 3.0e38,
                                  float("inf"), float("nan")])
def test_triton_global_scale_step_matches_reference_for_any_supplied_amax(amax):
    # The kernel computes S = min(2688/amax, FLT_MAX), fl(1/6) * S and 1/S itself; every branch
    # (amax 0, 2688/amax overflowing, subnormal 1/S, non-finite amax reported as NaN) must give
    # the reference's bits, in quantize and in dequantize.
    x = torch.randn(48, 96, generator=_gen(7)) * 5
    for kw in (MODES["1d"], MODES["2d"]):
        a = assert_same(x.to(DEV), amax=torch.tensor(amax), **kw)
        assert a.amax.isnan().item() == (not math.isfinite(amax))


def test_triton_amax_and_hadamard_match_reference():
    x = (torch.randn(64, 256, generator=_gen(4)) * 3).bfloat16().to(DEV)
    for rht in (False, True):
        assert torch.equal(nvfp4.compute_amax(x, rht=rht, backend="triton"),
                           nvfp4.compute_amax(x, rht=rht, backend="reference"))
    for t in (x, x.float()):
        h = nvfp4.hadamard_transform(t, backend="triton")
        assert h.dtype == t.dtype
        assert torch.equal(h, nvfp4.hadamard_transform(t, backend="reference"))


def test_triton_sr_seed_changes_draws_and_repeats():
    x = torch.randn(64, 256, generator=_gen(5)).to(DEV)
    a = triton_nvfp4.quantize_1d_sr(x, seed=99)[0]
    assert torch.equal(a, triton_nvfp4.quantize_1d_sr(x, seed=99)[0])
    assert not torch.equal(a, triton_nvfp4.quantize_1d_sr(x, seed=100)[0])


def test_named_kernel_entry_points_agree_with_quantize():
    x = torch.randn(64, 128, generator=_gen(6)).to(DEV)
    amax = x.abs().amax().float()
    pairs = [
        (triton_nvfp4.quantize_1d(x), {}),
        (triton_nvfp4.quantize_2d(x), {"block_2d": True}),
        (triton_nvfp4.quantize_1d_sr(x, seed=5), {"stochastic": True, "seed": 5}),
        (triton_nvfp4.quantize_rht(x, stochastic=True, seed=5),
         {"rht": True, "stochastic": True, "seed": 5}),
    ]
    for (data, scale, _), kw in pairs:
        ref = nvfp4.quantize(x, backend="reference", **kw)
        assert torch.equal(data, ref.data) and torch.equal(scale.view(torch.uint8),
                                                           ref.scale.view(torch.uint8))
    assert torch.equal(triton_nvfp4.amax(x), amax)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("mode", list(MODES))
def test_compiled_triton_matches_reference_on_large_bf16(mode):
    x = (torch.randn(4096, 5120, device="cuda") * 3).bfloat16()
    assert_same(x, **MODES[mode])
    assert_same(x.t(), **MODES[mode]) if mode.startswith("rht") else None
