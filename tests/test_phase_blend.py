"""Blend planning (megatron_rlp/data/blend.py) and tools/build_phase_blend.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from megatron_rlp.data import blend
from megatron_rlp.data.indexed import write_indexed_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources():
    return [blend.Source("math_high", "math", "high", 1000, "/x/m"),
            blend.Source("wiki_high", "wiki", "high", 3000, "/x/w"),
            blend.Source("web_medium", "web", "medium", 4000, "/x/wm"),
            blend.Source("web_low", "web", "low", 2000, "/x/wl")]


def test_phase_budgets_add_up_and_follow_the_split():
    plan = blend.plan_phases(_sources(), 5001)
    assert [p.tokens for p in plan.phases] == [3001, 2000]
    for p in plan.phases:
        assert sum(p.shares.values()) == pytest.approx(1.0)
        assert sum(p.source_tokens.values()) == pytest.approx(p.tokens)


def test_phase1_is_natural_and_phase2_upweights_high_tiers_and_math():
    plan = blend.plan_phases(_sources(), 5000)
    p1, p2 = plan.phases
    assert p1.shares["web_low"] == pytest.approx(2000 / 10000)  # natural distribution
    assert "web_low" not in p2.shares                            # low tier dropped
    # math is boosted x2 over another high source of the same tier
    assert p2.shares["math_high"] / 1000 == pytest.approx(2 * p2.shares["wiki_high"] / 3000)
    assert p2.shares["web_medium"] < p1.shares["web_medium"]


def test_budget_over_an_epoch_cap_is_rejected_with_the_largest_valid_budget():
    limit = blend.max_total_tokens(_sources(), blend.default_phases())
    blend.plan_phases(_sources(), limit)  # exactly at the limit is fine
    with pytest.raises(ValueError, match=r"exceeds the epoch cap .*web_low \(tier low.*cap 1.*"
                                         rf"largest budget within every cap is {limit:,}"):
        blend.plan_phases(_sources(), limit + 100)


@pytest.mark.parametrize("kwargs, message", [
    (dict(total_tokens=0), "must be a positive integer"),
    (dict(epoch_caps={"high": 4}), "tier 'medium' with no epoch cap"),
    (dict(phases=[blend.PhaseSpec("a", 0.5, {"high": 1, "medium": 1, "low": 1})]),
     "summing to 1"),
    (dict(phases=[blend.PhaseSpec("a", 1.0, {"high": 0, "medium": 0, "low": 0})]),
     "every source weight 0"),
])
def test_bad_plans_are_rejected(kwargs, message):
    args = dict(sources=_sources(), total_tokens=5000)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        blend.plan_phases(**args)


def test_sample_accounting_is_a_pure_function_of_consumed_samples():
    budgets = blend.phase_sample_budgets([1000, 700], seq_length=64, global_batch_size=4)
    assert budgets == [16, 12]  # 1000/64 = 15.6 -> 4 batches; 700/64 = 10.9 -> 3 batches
    assert blend.locate(15, budgets) == (0, 15)
    assert blend.locate(16, budgets) == (1, 0)
    assert blend.locate(40, budgets) == (1, 24)  # past the blend: the last phase continues
    assert blend.samples_per_phase(20, budgets) == [16, 4]
    assert blend.samples_per_phase(50, budgets) == [16, 34]


def test_table_lists_every_source_and_phase():
    table = blend.format_table(blend.plan_phases(_sources(), 5000))
    for name in ("math_high", "web_low", "phase1 epochs", "phase2 tokens", "TOTAL"):
        assert name in table


def _manifest(tmp_path):
    rng = np.random.default_rng(0)
    entries = []
    for name, cat, tier, n in (("m_high", "math", "high", 3000), ("w_low", "web", "low", 2000)):
        write_indexed_dataset(str(tmp_path / name), [rng.integers(0, 100, n // 10)
                                                     for _ in range(10)], dtype=np.uint16)
        entries.append({"name": name, "category": cat, "tier": tier, "tokens": n, "path": name})
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"sources": entries}))
    return str(path)


def _tool(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "build_phase_blend.py"),
                           *args], capture_output=True, text=True, timeout=60)


def test_tool_writes_loadable_blend_and_prints_table(tmp_path):
    from megatron_rlp.data.phases import load_blend

    out = tmp_path / "sub" / "blend.yaml"
    r = _tool("--manifest", _manifest(tmp_path), "--total-tokens", "4000", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert "phase1 epochs" in r.stdout and "m_high" in r.stdout
    doc = yaml.safe_load(out.read_text())
    assert [p["tokens"] for p in doc["phases"]] == [2400, 1600]
    phases = load_blend(str(out))
    assert phases[1].data_path == ["1.0", str(tmp_path / "m_high")]  # low tier left out
    assert os.path.isfile(phases[0].data_path[1] + ".bin")  # relative paths resolve


def test_tool_rejects_budget_over_cap_and_writes_nothing(tmp_path):
    out = tmp_path / "blend.yaml"
    r = _tool("--manifest", _manifest(tmp_path), "--total-tokens", "1e6", "--output", str(out))
    assert r.returncode == 2
    assert "exceeds the epoch cap" in r.stderr and "w_low" in r.stderr
    assert not out.exists()
    assert "--epoch-cap" in _tool("--help").stdout
