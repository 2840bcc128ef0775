"""The NVFP4 recipe in the trainer: the start-up plan, real quantization of the planned layers,
training close to the BF16 baseline, the BF16 switch (and resumes across it), and TP / SP / DP / PP
runs equal to the one-process run.

Tiny model (tests/conftest.py TINY_MODEL_FLAGS, pattern M*M-) with one BF16 block at each edge:
block 1 (attention: linear_qkv, linear_proj) and block 2 (Mamba: out_proj) are NVFP4; the Mamba
in_proj has 2*64 + 2*2*16 + 4 = 196 output rows, not a multiple of 16, so it stays in the run's
precision. That is 3 NVFP4 linears = 9 quantized GEMMs (fprop, dgrad, wgrad) per micro-batch.
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, TINY_MODEL_FLAGS, read_metrics, run_cli
from megatron_rlp.config import parse_args
from megatron_rlp.kernels import nvfp4
from megatron_rlp.quant import QUANT_STATS
from megatron_rlp.quant import integration as I

EDGES = ["--fp4-bf16-first-layers", "1", "--fp4-bf16-last-layers", "1"]
FP4 = ["--fp4", "nvfp4", *EDGES]
FP4_LINEARS_TINY = 3
GEMMS_PER_MICROBATCH = 3 * FP4_LINEARS_TINY


def _cfg(*extra):
    return parse_args(TINY_MODEL_FLAGS + list(extra))


# ---------------------------------------------------------------------------------------- plan

def test_startup_plan_lists_every_block_with_its_precision(tiny_flags, tmp_path):
    pattern = ["--num-layers", "6", "--hybrid-override-pattern", "M*M-M-"]
    result = run_cli(tiny_flags + pattern + ["--fp4", "nvfp4", "--fp4-bf16-first-layers", "2",
                                             "--fp4-bf16-last-layers", "1", "--train-iters", "1",
                                             "--save", str(tmp_path / "run")])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    top = lines.index("NVFP4 precision plan (--fp4 nvfp4):")
    rows = [line.split(None, 4) for line in lines[top + 3:top + 9]]
    assert [r[0] for r in rows] == ["0", "1", "2", "3", "4", "5"]
    assert [r[1] for r in rows] == ["mamba", "attention", "mamba", "mlp", "mamba", "mlp"]
    assert [r[2] for r in rows] == ["fp32", "fp32", "nvfp4", "nvfp4", "nvfp4", "fp32"]
    assert rows[0][4] == "first 2 blocks" and rows[1][4] == "first 2 blocks"
    assert rows[5][4] == "last 1 blocks"
    assert rows[2][3] == "out_proj"   # in_proj kept out, with the reason on the same line
    assert "in_proj kept fp32: weight [196, 64] not a multiple of 16" in rows[2][4]
    assert rows[3][3] == "linear_fc1,linear_fc2" and rows[3][4] == "middle block"
    assert lines[top + 9].startswith("NVFP4 blocks: 3/6, linears: 4/12")
    assert result.stdout.count("NVFP4 precision plan") == 1

    # The checkpoint loads computing as the run did at its last iteration, and says so.
    from megatron_rlp import load_model
    from megatron_rlp.training.distributed import destroy_distributed

    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    try:
        as_trained = load_model(str(tmp_path / "run"), device="cpu")
        assert as_trained.precision == "nvfp4" and "precision=nvfp4" in repr(as_trained)
        before = QUANT_STATS["fprop"]
        with torch.no_grad():
            fp4_logits = as_trained(ids)
        assert QUANT_STATS["fprop"] - before == 4   # the 4 planned linears
        high = load_model(str(tmp_path / "run"), device="cpu", precision="fp32")
        assert high.precision == "fp32"
        with torch.no_grad():
            assert (high(ids) - fp4_logits).abs().max() > 1e-4
        assert QUANT_STATS["fprop"] - before == 4
        with pytest.raises(ValueError, match="precision='bf16': use one of auto, fp32"):
            load_model(str(tmp_path / "run"), precision="bf16")
    finally:
        destroy_distributed()


def test_plan_under_tp2_checks_per_shard_shapes():
    plan = I.linear_plan(_cfg(*FP4, "--tensor-model-parallel-size", "2"))
    assert plan[(1, "linear_qkv")].local_shape == (64, 64) and plan[(1, "linear_qkv")].fp4
    assert plan[(1, "linear_proj")].local_shape == (64, 32) and plan[(1, "linear_proj")].fp4
    assert plan[(2, "in_proj")].local_shape == (98, 64) and not plan[(2, "in_proj")].fp4
    assert "per TP rank" in plan[(2, "in_proj")].reason
    assert not any(p.fp4 for (layer, _), p in plan.items() if layer in (0, 3))


@pytest.mark.parametrize("extra,message", [
    (["--fp4", "nvfp4"], "--fp4-bf16-first-layers=2 + --fp4-bf16-last-layers=8: keep all 4 "
                         "blocks in BF16"),
    (["--fp4", "nvfp4", *EDGES, "--hidden-size", "72", "--num-attention-heads", "4",
      "--kv-channels", "18"], "no linear layer of the middle blocks"),
])
def test_fp4_that_would_quantize_nothing_is_rejected(extra, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        I.checked_linear_plan(_cfg(*extra))


def test_without_fp4_flag_nothing_is_converted():
    from megatron_rlp.models.hybrid import build_model
    from megatron_rlp.training.distributed import destroy_distributed, init_distributed

    cfg = _cfg()
    assert cfg.fp4.fp4 is None
    init_distributed(cfg.parallel, seed=5)
    try:
        model = build_model(cfg, vocab_size=100)
        assert I.apply_nvfp4([model], cfg) is None
        assert not any(isinstance(m, I.NVFP4_LINEAR_TYPES) for m in model.modules())
        assert I.nvfp4_callbacks(cfg, [model], None, None) == []
    finally:
        destroy_distributed()


# ------------------------------------------------------------- the quantizer is really in the path

@pytest.fixture
def twin_models():
    """(fp4 model, plain model with identical weights, RecipeState) in a world of one."""
    from megatron_rlp.models.hybrid import build_model
    from megatron_rlp.training.distributed import destroy_distributed, init_distributed

    cfg = _cfg(*FP4, "--seed", "5")
    init_distributed(cfg.parallel, seed=5)
    try:
        fp4_model = build_model(cfg, vocab_size=100)
        plain = build_model(cfg, vocab_size=100)
        plain.load_state_dict(fp4_model.state_dict())
        state = I.apply_nvfp4([fp4_model], cfg)
        # Converted right away: a model built outside the trainer runs NVFP4 from here on.
        assert state.active and I.nvfp4_state([fp4_model]) is state
        assert [(p.layer, p.role) for p in state.converted] == [
            (1, "linear_qkv"), (1, "linear_proj"), (2, "out_proj")]
        converted = [m for m in fp4_model.modules() if isinstance(m, I.NVFP4_LINEAR_TYPES)]
        assert len(converted) == 3 and all(m.nvfp4_state is state for m in converted)
        assert fp4_model.state_dict().keys() == plain.state_dict().keys()
        yield fp4_model, plain, state
    finally:
        destroy_distributed()


def test_planned_layers_pass_through_the_quantizer(twin_models):
    fp4_model, plain, state = twin_models
    ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    captured = {}
    qkv = fp4_model.decoder.layers[1].self_attention.linear_qkv
    handle = qkv.register_forward_hook(
        lambda mod, args, out: captured.update(x=args[0].detach(), y=out[0].detach()))
    before = dict(QUANT_STATS)
    logits = fp4_model(ids, None, None)
    handle.remove()
    assert QUANT_STATS["fprop"] - before.get("fprop", 0) == FP4_LINEARS_TINY
    logits.float().square().mean().backward()
    assert QUANT_STATS["dgrad"] - before.get("dgrad", 0) == FP4_LINEARS_TINY
    assert QUANT_STATS["wgrad"] - before.get("wgrad", 0) == FP4_LINEARS_TINY

    with torch.no_grad():
        reference = plain(ids, None, None)
    assert (logits - reference).abs().max() > 1e-4   # quantization changed the numbers

    # One layer by hand: 1x16 RNE activations, 16x16 weights, fp32 matmul of the dequantized.
    x2d = captured["x"].reshape(-1, qkv.weight.shape[1])
    manual = (nvfp4.quantize(x2d).dequantize()
              @ nvfp4.quantize(qkv.weight.detach(), block_2d=True).dequantize().t())
    torch.testing.assert_close(captured["y"].reshape(manual.shape), manual, atol=0, rtol=0)
    # BF16 blocks and linears kept out of the plan stay megatron's: block 2's in_proj.
    assert not isinstance(fp4_model.decoder.layers[2].mixer.in_proj, I.NVFP4_LINEAR_TYPES)


def test_recipe_switched_off_gives_the_plain_model(twin_models):
    fp4_model, plain, state = twin_models
    state.active = False
    ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(1))
    before = sum(QUANT_STATS.values())
    with torch.no_grad():
        torch.testing.assert_close(fp4_model(ids, None, None), plain(ids, None, None),
                                   atol=0, rtol=0)
    assert sum(QUANT_STATS.values()) == before


# ------------------------------------------------------------------------- training end to end

# The 200 steps, BF16 model vs the same BF16 model with NVFP4 blocks, same seed and data.
# Both runs go concurrently, one thread each (a multi-threaded emulated GEMM on 2 busy cores is
# 10x slower): ~65 s wall measured. Measured gap of the last-10-iteration mean loss: 0.0019
# (bf16 1.9661, nvfp4 1.9680; fp32 model: 0.0058); 20-iteration window means along the run
# differ by at most 0.016. Bound: 0.02 (~1% of the final loss).
TRAIN_STEPS = 200
MARGIN = 0.02


@pytest.mark.slow
def test_fp4_training_tracks_the_bf16_loss(tiny_flags, tmp_path):
    common = tiny_flags + ["--train-iters", str(TRAIN_STEPS), "--seed", "1234", "--bf16"]
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "megatron_rlp.train", *common, *extra,
         "--save", str(tmp_path / name)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for name, extra in (("bf16", []), ("nvfp4", FP4))}
    runs = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-2000:]
        runs[name] = read_metrics(str(tmp_path / name))
    base, fp4 = runs["bf16"], runs["nvfp4"]
    assert [r["iteration"] for r in fp4] == list(range(1, TRAIN_STEPS + 1))
    assert all(r["fp4_active"] and r["nvfp4_gemms"] == GEMMS_PER_MICROBATCH for r in fp4)
    tail = lambda records: sum(r["loss"] for r in records[-10:]) / 10  # noqa: E731
    gap = abs(tail(fp4) - tail(base))
    print(f"last-10 mean loss: bf16 {tail(base):.4f}, nvfp4 {tail(fp4):.4f}, gap {gap:.4f}")
    assert tail(fp4) < fp4[0]["loss"] - 3.0        # it trains
    assert gap <= MARGIN
    assert fp4[-1]["loss"] != base[-1]["loss"]     # and it is not the baseline in disguise


@pytest.mark.slow
def test_switch_to_bf16_at_fraction_and_resume_across_it(tiny_flags, tmp_path):
    from mp_utils import checkpoint_as_if_killed_at

    # 8 iterations, switch at 0.5 -> iterations 0..3 (logged 1..4) NVFP4, 4..7 (logged 5..8) not.
    args = tiny_flags + FP4 + ["--train-iters", "8", "--fp4-switch-to-bf16-at", "0.5",
                               "--lr-decay-iters", "8"]
    straight = str(tmp_path / "straight")
    result = run_cli(args + ["--save", straight, "--save-interval", "3"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "all fp32 from iteration 4 of 8" in result.stdout
    assert result.stdout.count("NVFP4: switching all blocks to FP32 at iteration 4") == 1
    records = read_metrics(straight)
    assert [r["fp4_active"] for r in records] == [True] * 4 + [False] * 4
    assert [r["nvfp4_gemms"] for r in records] == [GEMMS_PER_MICROBATCH] * 4 + [0] * 4
    expected = {r["iteration"]: r["loss"] for r in records}

    for saved, message in ((3, "NVFP4: switching all blocks to FP32 at iteration 4"),
                           (6, "NVFP4: starting at iteration 6, at or past the switch point")):
        resumed = checkpoint_as_if_killed_at(straight, saved, str(tmp_path / f"from{saved}"))
        result = run_cli(args + ["--save", resumed, "--load", resumed])
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"resuming at {saved}" in result.stdout and message in result.stdout
        got = {r["iteration"]: r for r in read_metrics(resumed)}
        for iteration in range(saved + 1, 9):
            assert abs(got[iteration]["loss"] - expected[iteration]) <= 1e-6, iteration
            assert got[iteration]["fp4_active"] == (iteration <= 4)


# Layout -> (ranks, flags, SR on). Measured: every layout equals the one-process run exactly
# (0.0). Under TP each GEMM operand's global amax is all-reduced over the TP group so the shards
# quantize with the unsharded tensor's scales (removing the all-reduce: 5.7e-5 relative). TP runs
# with SR off: a sharded tensor's SR draws depend on the shard layout (seeds differ per TP rank;
# 2.7e-4 at step 3 with SR on). DP and PP keep SR on: micro-batch j of DP rank r seeds as global
# micro-batch j * DP + r, the index it has in the one-process run.
LAYOUTS = {
    "tp2": (2, ["--tensor-model-parallel-size", "2"], False),
    "tp2_sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"], False),
    "dp2": (2, [], True),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"], True),
}


@pytest.fixture(scope="module")
def layout_losses(embedded_dir, tmp_path_factory):
    """(layout name, SR on) -> losses of 3 steps, 8 sequences per step; each run launched once."""
    from mp_utils import launch, logged_losses

    scratch = str(tmp_path_factory.mktemp("fp4_layouts"))
    args = TINY_MODEL_FLAGS + FP4 + ["--embedded-data-dir", embedded_dir, "--train-iters", "3",
                                     "--global-batch-size", "8", "--seed", "7"]
    done = {}

    def get(name, sr):
        if (name, sr) not in done:
            nproc, flags, _ = LAYOUTS.get(name, (1, [], sr))
            save = os.path.join(scratch, f"{name}_sr{int(sr)}")
            result = launch(args + flags + ["--save", save] + ([] if sr else ["--no-use-sr"]),
                            nproc, scratch)
            assert result.returncode == 0, result.stderr[-3000:]
            done[(name, sr)] = logged_losses(save)
        return done[(name, sr)]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp4_parallel_layout_losses_match_one_process(layout_losses, layout):
    from mp_utils import max_rel_diff

    sr = LAYOUTS[layout][2]
    reference, losses = layout_losses("one_process", sr), layout_losses(layout, sr)
    assert sorted(losses) == [1, 2, 3]
    assert max_rel_diff(losses, reference) <= 1e-6, (losses, reference)


def test_model_routes_its_nvfp4_linears_to_the_te_backend(twin_models, monkeypatch):
    """state.gemm='te' sends every tagged linear through TE's API (a CPU stand-in here) and, with
    RHT and SR off (fp32 model), gives the emulated model's logits and gradients bit for bit."""
    import fake_te
    from megatron_rlp.quant.recipe import replace

    fp4_model, _, state = twin_models
    state.recipe = replace(state.recipe, use_rht=False, use_sr=False)
    te = fake_te.install(monkeypatch)
    ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(2))

    def logits_and_grads(gemm):
        state.gemm = gemm
        fp4_model.zero_grad()
        logits = fp4_model(ids, None, None)
        logits.float().square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in fp4_model.parameters()]

    te_logits, te_grads = logits_and_grads("te")
    assert len(te.made) == 3 * FP4_LINEARS_TINY    # x, W, dy quantizers per NVFP4 linear
    emu_logits, emu_grads = logits_and_grads("emulated")
    assert len(te.made) == 3 * FP4_LINEARS_TINY    # the emulation does not touch TE
    assert torch.equal(te_logits, emu_logits)
    assert all(torch.equal(a, b) for a, b in zip(te_grads, emu_grads))
