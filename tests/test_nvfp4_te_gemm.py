"""The TransformerEngine GEMM backend of the NVFP4 linear: when it is chosen, what it refuses with
which message, and that its operands and GEMM layouts compute the emulated recipe.

On CPU the TE calls go to ``fake_te`` (our reference quantizer behind TE's API and layout rules);
the ``gpu`` test at the end runs real TE wherever a GPU is lent (and checks the refusal on GPUs
without FP4 tensor cores)."""
import pytest
import torch

import fake_te
from conftest import TINY_MODEL_FLAGS, run_cli
from megatron_rlp.config import parse_args
from megatron_rlp.quant import (QUANT_STATS, NVFP4Recipe, fp4_gemm_support, nvfp4_linear,
                                resolve_gemm)
from megatron_rlp.quant import integration as I

NO_SR = NVFP4Recipe(fp4="nvfp4", use_sr=False)


def _data(t, k=128, n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) * k ** -0.5).bfloat16()
    dy = torch.randn(t, n, generator=g).bfloat16()
    return x, w, dy


def _run(x, w, dy, recipe, gemm, sr_seed=0):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = nvfp4_linear(x, w, recipe=recipe, gemm=gemm, sr_seed=sr_seed)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------------------ choosing a backend

def test_resolve_gemm_auto_follows_support_and_te_refuses_with_the_reason():
    assert resolve_gemm("auto", (True, "TE 2.14 on sm_100")) == ("te", "TE 2.14 on sm_100")
    assert resolve_gemm("auto", (False, "no CUDA device")) == ("emulated", "no CUDA device")
    assert resolve_gemm("emulated", (True, "TE"))[0] == "emulated"
    with pytest.raises(ValueError, match="--fp4-gemm te: .*unavailable here: no CUDA device"):
        resolve_gemm("te", (False, "no CUDA device"))


def test_unknown_fp4_gemm_value_is_rejected():
    with pytest.raises(ValueError, match="--fp4-gemm='cublas': use one of auto, emulated, te"):
        NVFP4Recipe(fp4="nvfp4", fp4_gemm="cublas")


def _gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_support_probe_on_this_cpu_machine():
    assert fp4_gemm_support(bf16=True, use_rht=True) == (False, "no CUDA device")


@pytest.mark.parametrize("capability,te,bf16,expect", [
    ((9, 0), {}, True, "compute capability 9.0 has no FP4 tensor cores"),
    ((10, 0), None, True, "transformer_engine does not import"),
    ((10, 0), {"version": "2.13.1"}, True, "transformer_engine 2.13.1 is older than 2.14"),
    ((10, 0), {"nvfp4_available": (False, "cuBLAS too old")}, True,
     "reports NVFP4 unavailable: cuBLAS too old"),
    ((10, 0), {}, False, "RHT kernels take BF16 input only; train with --bf16"),
])
def test_support_probe_names_what_is_missing(monkeypatch, capability, te, bf16, expect):
    _gpu(monkeypatch, capability)
    if te is None:
        monkeypatch.setitem(__import__("sys").modules, "transformer_engine", None)
    else:
        fake_te.install(monkeypatch, **te)
    ok, why = fp4_gemm_support(bf16=bf16, use_rht=True)
    assert not ok and expect in why


def test_support_probe_accepts_blackwell_with_te_2_14(monkeypatch):
    _gpu(monkeypatch, (10, 0))
    fake_te.install(monkeypatch, version="2.14.0")
    assert fp4_gemm_support(bf16=True, use_rht=True) == (True, "TransformerEngine 2.14.0 on sm_100")
    # fp32 runs are fine without RHT (TE's plain quantizers take fp32)
    assert fp4_gemm_support(bf16=False, use_rht=False)[0]


def test_trainer_refuses_fp4_gemm_te_here_in_one_line(tiny_flags, tmp_path):
    result = run_cli(tiny_flags + ["--fp4", "nvfp4", "--fp4-bf16-first-layers", "1",
                                   "--fp4-bf16-last-layers", "1", "--fp4-gemm", "te",
                                   "--train-iters", "1", "--save", str(tmp_path / "run")])
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "--fp4-gemm te" in line]
    assert len(errors) == 1 and "no CUDA device" in errors[0], result.stderr[-2000:]


def test_plan_names_the_gemm_backend_and_why():
    cfg = parse_args(TINY_MODEL_FLAGS + ["--fp4", "nvfp4", "--fp4-bf16-first-layers", "1",
                                         "--fp4-bf16-last-layers", "1"])
    text = I.format_linear_plan(cfg, I.linear_plan(cfg), ("emulated", "no CUDA device"))
    assert text.splitlines()[-1] == ("NVFP4 GEMMs: emulated (fp32 matmul of dequantized "
                                     "operands) (no CUDA device)")


# -------------------------------------------------------------- the TE path computes the recipe

@pytest.mark.parametrize("recipe", [
    NO_SR,
    NVFP4Recipe(fp4="nvfp4", use_sr=False, use_rht=False),
    NVFP4Recipe(fp4="nvfp4", use_sr=False, use_2d_weights=False),
], ids=["full", "no-rht", "1d-weights"])
def test_te_path_equals_emulation_bit_for_bit_without_sr(monkeypatch, recipe):
    fake_te.install(monkeypatch)
    x, w, dy = _data(t=64)
    te_out, emu_out = _run(x, w, dy, recipe, "te"), _run(x, w, dy, recipe, "emulated")
    for name, a, b in zip(("y", "dx", "dw"), te_out, emu_out):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("t,n,k", [(40, 96, 128), (64, 48, 80), (40, 48, 80)],
                         ids=["ragged-tokens", "n-k-not-32-aligned", "all-unaligned"])
def test_te_path_zero_pads_to_32_and_slices_the_padding_off(monkeypatch, t, n, k):
    fake_te.install(monkeypatch)
    x, w, dy = _data(t=t, k=k, n=n)
    te_out, emu_out = _run(x, w, dy, NO_SR, "te"), _run(x, w, dy, NO_SR, "emulated")
    assert [o.shape for o in te_out] == [(t, n), (t, k), (n, k)]
    for name, a, b in zip(("y", "dx", "dw"), te_out, emu_out):
        # Same quantized operands (the padding forms its own all-zero blocks); a padded
        # reduction is longer by zeros, which may only reorder fp32 sums before the bf16 output.
        assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-6), name


@pytest.mark.parametrize("recipe", [
    NVFP4Recipe(fp4="nvfp4"),
    NVFP4Recipe(fp4="nvfp4", use_rht=False, use_sr=False, use_2d_weights=False),
], ids=["full", "all-ablations"])
def test_te_quantizer_per_operand_follows_the_recipe(monkeypatch, recipe):
    te = fake_te.install(monkeypatch)
    _run(*_data(t=32), recipe, "te")
    x_q, w_q, dy_q = te.made
    rht, sr = recipe.use_rht, recipe.use_sr
    assert (x_q["rht"], x_q["sr"], x_q["two_d"]) == (rht, False, False)
    assert (w_q["rht"], w_q["sr"], w_q["two_d"]) == (False, False, recipe.use_2d_weights)
    assert (dy_q["rht"], dy_q["sr"], dy_q["two_d"]) == (rht, sr, False)
    assert all(q["rowwise"] and q["columnwise"] and not q["amax_reduction"] for q in te.made)


def test_te_path_with_sr_counts_gemms_and_stays_near_the_emulation(monkeypatch):
    fake_te.install(monkeypatch)
    recipe = NVFP4Recipe(fp4="nvfp4")
    x, w, dy = _data(t=64)
    before = dict(QUANT_STATS)
    y, dx, dw = _run(x, w, dy, recipe, "te")
    assert {k: QUANT_STATS[k] - before.get(k, 0) for k in ("fprop", "dgrad", "wgrad")} == \
        {"fprop": 1, "dgrad": 1, "wgrad": 1}
    ey, edx, edw = _run(x, w, dy, recipe, "emulated", sr_seed=3)
    assert torch.equal(y, ey)            # fprop has no SR
    # different SR draws: both are unbiased NVFP4 gradients (emulation's own error vs fp32 is
    # ~0.15, see test_nvfp4_linear), so they differ from each other by that order, not more
    assert 0 < _rel(dx, edx) < 0.3 and 0 < _rel(dw, edw) < 0.3


def test_te_path_rejects_fp32_with_rht_like_te(monkeypatch):
    fake_te.install(monkeypatch)
    x, w, dy = (t.float() for t in _data(t=32))
    with pytest.raises(RuntimeError, match="RHT is only supported for bfloat16"):
        _run(x, w, dy, NVFP4Recipe(fp4="nvfp4"), "te")


# ------------------------------------------------------------------------------------ real GPU

@pytest.mark.gpu
def test_real_te_gemm_on_this_gpu_or_a_clear_refusal():
    assert torch.cuda.is_available(), "gpu tests need a CUDA device"
    ok, why = fp4_gemm_support(bf16=True, use_rht=True)
    if not ok:
        # e.g. H100/H200 (sm_90): the emulation runs and --fp4-gemm te says why it cannot
        major, _ = torch.cuda.get_device_capability()
        assert major < 10 or "transformer_engine" in why, why
        assert resolve_gemm("auto", (ok, why)) == ("emulated", why)
        with pytest.raises(ValueError, match="--fp4-gemm te"):
            resolve_gemm("te", (ok, why))
        return
    x, w, dy = (t.cuda() for t in _data(t=256, k=512, n=384))
    te_out, emu_out = _run(x, w, dy, NO_SR, "te"), _run(x, w, dy, NO_SR, "emulated")
    # Identical quantized operands (TE >= 2.14 numerics); only the GEMM accumulation and the
    # bf16 output rounding differ.
    for name, a, b in zip(("y", "dx", "dw"), te_out, emu_out):
        assert _rel(a, b) < 1e-2, (name, _rel(a, b))


def test_te_quantizers_reduce_amax_over_the_tp_group(monkeypatch, tmp_path):
    import torch.distributed as dist

    te = fake_te.install(monkeypatch)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        group = dist.new_group([0])
        x, w, dy = _data(t=32)
        x, w = x.requires_grad_(), w.requires_grad_()
        nvfp4_linear(x, w, recipe=NO_SR, gemm="te", amax_reduce_group=group).backward(dy)
    finally:
        dist.destroy_process_group()
    assert len(te.made) == 3 and all(q["amax_reduction"] for q in te.made)
