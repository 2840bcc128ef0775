"""Smoke tests of the small-scale reproductions (examples/experiments/*.py --quick).

Each experiment runs end to end at micro scale in a subprocess (as a user runs it) and must leave
a report.md and a metrics.json with the expected keys and finite numbers. The scientific outcome
is not asserted: at this scale it is noise; the full-mode results live in docs/RESULTS.md.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

EXPERIMENTS = os.path.join(REPO_ROOT, "examples", "experiments")


def _run_quick(name: str, out: str, embedded_dir: str) -> dict:
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(EXPERIMENTS, f"{name}.py"), "--quick", "--out", out,
         "--embedded-data-dir", embedded_dir],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for f in ("report.md", "metrics.json"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")], "left a temp file"
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_two_phase_quick_reports_held_out_loss_per_variant_and_split(tmp_path, embedded_dir):
    out = str(tmp_path / "two_phase")
    m = _run_quick("two_phase", out, embedded_dir)
    assert m["experiment"] == "two_phase" and m["quick"] is True
    assert set(m["summary"]) == {"natural", "random", "two_phase"}
    for variant, s in m["summary"].items():
        for split in ("high_quality", "reasoning", "web"):
            assert _finite(s[split]["mean"]) and s[split]["mean"] > 0, (variant, split)
    two_phase_runs = [r for r in m["runs"].values() if r["variant"] == "two_phase"]
    assert two_phase_runs and all(r["phases"] for r in two_phase_runs), "phase not logged"
    for f in ("loss_curves.png", "eval_bars.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0


@pytest.mark.slow
def test_rlp_vs_cpt_quick_matches_cpt_tokens_to_rlp_flops_and_evaluates_both_ways(
        tmp_path, embedded_dir):
    out = str(tmp_path / "rlp_vs_cpt")
    m = _run_quick("rlp_vs_cpt", out, embedded_dir)
    runs, sc = m["runs"], m["scale"]
    seeds = sc["seeds"]
    assert set(runs) == {"base"} | {f"{arm}_s{s}" for arm in ("rlp", "cpt") for s in seeds}
    # The same LR grid for both arms; each arm's best comes from it.
    assert sorted(g["lr"] for g in m["grid"] if g["kind"] == "rlp") == sorted(sc["lrs"])
    assert sorted(g["lr"] for g in m["grid"] if g["kind"] == "cpt") == sorted(sc["lrs"])
    assert m["best_lr"]["rlp"] in sc["lrs"] and m["best_lr"]["cpt"] in sc["lrs"]
    batch = sc["mbs"] * sc["seq"]
    for s in seeds:
        rlp, cpt = runs[f"rlp_s{s}"], runs[f"cpt_s{s}"]
        assert rlp["ntp_equivalent_tokens"] > 0 and 0 <= rlp["stopped_frac"] <= 1
        # FLOP matching: CPT reads the RLP run's NTP-equivalent tokens, rounded up to one batch.
        assert cpt["matched_to_tokens"] == rlp["ntp_equivalent_tokens"]
        assert rlp["ntp_equivalent_tokens"] <= cpt["tokens"] < rlp["ntp_equivalent_tokens"] + batch
    for name, r in runs.items():
        e = r["test"]
        assert e["questions"] > 0 and 0 <= e["think_acc"] <= 1 and 0 <= e["no_think_acc"] <= 1
        assert _finite(e["gain_result"]) and _finite(e["gain_ordinary"]), name
        for cls in ("result", "ordinary"):
            t = e["tokens"][cls]
            assert t["tokens"] > 0 and _finite(t["loss"]) and 0 <= t["acc"] <= 1, (name, cls)
    for key in ("think_acc", "no_think_acc", "result_loss", "ordinary_loss"):
        assert len(m["paired"][key]["per_seed"]) == len(seeds)
    for f in ("reward.png", "accuracy.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0


def test_think_eval_finds_every_worked_step_result():
    sys.path.insert(0, EXPERIMENTS)
    from think_eval import result_questions

    text = ("Problem 1: compute 45 + 37 - 90.\nStep 1: 45 + 37 = 82\nStep 2: 82 - 90 = -8\n"
            "Answer: -8\n\nProblem 2: compute 3 * 4.\nStep 1: 3 * 4 = 12\nAnswer: 12")
    assert result_questions([text]) == [
        (text[:text.index("= 82") + 1], "82"),
        (text[:text.index("= -8") + 1], "-8"),
        (text[:text.index("= 12") + 1], "12")]


@pytest.mark.slow
def test_nvfp4_ablation_quick_reports_gap_to_bf16(tmp_path, embedded_dir):
    out = str(tmp_path / "nvfp4")
    m = _run_quick("nvfp4_ablation", out, embedded_dir)
    assert set(m["summary"]) == {"bf16", "nvfp4"}
    assert m["summary"]["bf16"]["rel_gap_mean"] == 0.0
    assert _finite(m["summary"]["nvfp4"]["rel_gap_mean"])
    nv = [r for r in m["runs"].values() if r["variant"] == "nvfp4"]
    assert nv and all(r["nvfp4_gemms"] > 0 for r in nv), "the recipe ran no NVFP4 GEMM"
    bf = [r for r in m["runs"].values() if r["variant"] == "bf16"]
    assert all(r["nvfp4_gemms"] == 0 for r in bf)
    assert os.path.getsize(os.path.join(out, "gap.png")) > 0


def test_result_token_classifier_marks_digits_after_equals_only():
    sys.path.insert(0, EXPERIMENTS)
    from rlp_vs_cpt import classify

    pieces = ["Step", "Ġ1", ":", "Ġ4", "5", "Ġ+", "Ġ3", "7", "Ġ=", "Ġ8", "2", "Ċ", "x", "Ġ=",
              "Ġ-", "5", "."]
    cats = classify(pieces)
    assert len(cats) == len(pieces) - 1
    result = [p for p, c in zip(pieces[1:], cats) if c == "result"]
    assert result == ["Ġ8", "2", "Ġ-", "5"]
