"""NVFP4 recipe: per-layer plan by index and kind, the BF16 switch, SR seeds, config checks."""
import pytest

from megatron_rlp.quant import recipe as R
from megatron_rlp.config import NVFP4Recipe


def test_plan_keeps_first_and_last_blocks_bf16_and_selects_by_kind():
    plan = R.precision_plan(8, "M*M-M*M-", bf16_first_layers=2, bf16_last_layers=3)
    assert [p.precision for p in plan] == ["bf16"] * 2 + ["nvfp4"] * 3 + ["bf16"] * 3
    assert [p.kind for p in plan[:4]] == ["mamba", "attention", "mamba", "mlp"]
    assert plan[2].linears == ("in_proj", "out_proj")
    assert plan[3].linears == ("linear_fc1", "linear_fc2")
    assert plan[0].linears == () and plan[0].reason == "first 2 blocks"
    assert plan[7].reason == "last 3 blocks"
    assert [p.index for p in plan] == list(range(8))


def test_plan_with_fp4_off_or_overlapping_edges_is_all_bf16():
    assert all(p.precision == "bf16" for p in R.precision_plan(4, "M*M-", 1, 1, fp4=None))
    assert all(p.precision == "bf16" for p in R.precision_plan(4, "M*M-", 2, 3))


def test_12b_defaults_give_2_first_and_8_last_bf16():
    pattern = ("M-" * 31)
    r = NVFP4Recipe(fp4="nvfp4")
    plan = R.plan_for(r, 62, pattern)
    prec = [p.precision for p in plan]
    assert prec[:2] == ["bf16"] * 2 and prec[-8:] == ["bf16"] * 8
    assert prec[2:-8] == ["nvfp4"] * 52


@pytest.mark.parametrize("n,expect", [(62, (2, 8)), (6, (1, 1)), (12, (1, 2)), (2, (0, 1)),
                                      (1, (0, 1))])
def test_scaled_bf16_layers_for_tiny_models(n, expect):
    assert R.scaled_bf16_layers(n) == expect


def test_format_plan_lists_every_block_and_the_switch():
    r = NVFP4Recipe(fp4="nvfp4", fp4_bf16_first_layers=1, fp4_bf16_last_layers=1,
                    fp4_switch_to_bf16_at=0.82)
    text = R.format_plan(R.plan_for(r, 4, "M*-M"), r, train_iters=200)
    lines = text.splitlines()
    assert len(lines) == 2 + 4 + 1
    assert "attention  nvfp4      linear_qkv,linear_proj" in lines[3]
    assert lines[-1].startswith("NVFP4 blocks: 2/4")
    assert "all BF16 from iteration 164 of 200" in lines[-1]


@pytest.mark.parametrize("n,pattern,match", [
    (3, "M*", "has 2 layers but --num-layers is 3"),
    (2, "MX", "unknown layer symbol\\(s\\) \\['X'\\]"),
    (0, "", "--num-layers=0: must be positive"),
])
def test_bad_patterns_are_rejected(n, pattern, match):
    with pytest.raises(ValueError, match=match):
        R.precision_plan(n, pattern, 0, 0)


@pytest.mark.parametrize("kw,match", [
    ({"fp4": "mxfp4"}, "--fp4='mxfp4'"),
    ({"fp4_bf16_first_layers": -1}, "--fp4-bf16-first-layers=-1"),
    ({"fp4_bf16_last_layers": 1.5}, "--fp4-bf16-last-layers=1.5"),
    ({"fp4_switch_to_bf16_at": 1.2}, "--fp4-switch-to-bf16-at=1.2"),
])
def test_bad_recipe_fields_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        NVFP4Recipe(**kw)


def test_switch_to_bf16_depends_only_on_iteration():
    r = NVFP4Recipe(fp4="nvfp4", fp4_switch_to_bf16_at=0.82)
    assert R.switch_iteration(100, 0.82) == 82            # not 83 from 82.00000000000001
    assert R.fp4_active(r, 81, 100) and not R.fp4_active(r, 82, 100)
    assert not R.fp4_active(r, 99, 100)
    assert R.fp4_active(NVFP4Recipe(fp4="nvfp4"), 10**6, 100)       # never switches
    assert not R.fp4_active(NVFP4Recipe(), 0, 100)                  # fp4 off
    assert R.switch_iteration(100, None) is None


def test_sr_seed_is_a_pure_function_of_its_arguments():
    a = R.sr_seed(1234, 57, 3, "in_proj")
    assert a == R.sr_seed(1234, 57, 3, "in_proj")            # resume-exact, process-independent
    assert 0 <= a < 2**62
    others = {R.sr_seed(1235, 57, 3, "in_proj"), R.sr_seed(1234, 58, 3, "in_proj"),
              R.sr_seed(1234, 57, 4, "in_proj"), R.sr_seed(1234, 57, 3, "out_proj"),
              R.sr_seed(1234, 57, 3, "in_proj", microbatch=1),
              R.sr_seed(1234, 57, 3, "in_proj", tp_rank=1)}
    assert a not in others and len(others) == 6


def test_recipe_fields_carry_flag_help():
    import dataclasses
    for f in dataclasses.fields(NVFP4Recipe):
        assert f.metadata.get("help"), f.name
    assert NVFP4Recipe().use_rht and NVFP4Recipe().use_sr and NVFP4Recipe().use_2d_weights
