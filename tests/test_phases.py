"""--data-phases: phase switching inside one run, sample accounting and resume."""
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL_FLAGS, read_metrics
from megatron_rlp.data.indexed import write_indexed_dataset
from megatron_rlp.data.phases import Phase, PhaseCallback, build_phased_source, load_blend
from megatron_rlp.data.tokenizer import build_tokenizer

SEQ, GBS = 16, 4


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    """Three sources whose tokens say where they came from (source a: 0-99, b: 100-199, ...)."""
    d = tmp_path_factory.mktemp("phase_data")
    rng = np.random.default_rng(0)
    out = {}
    for k, name in enumerate("abc"):
        docs = [rng.integers(100 * k, 100 * k + 100, rng.integers(20, 60)) for _ in range(40)]
        out[name] = write_indexed_dataset(str(d / name), docs, dtype=np.uint16)
    return out


def _phases(p):
    return [Phase("p1", 8 * SEQ, ["0.5", p["a"], "0.5", p["b"]]), Phase("p2", 12 * SEQ, [p["c"]])]


def _source(p, total, tmp_path):
    return build_phased_source(_phases(p), build_tokenizer(), SEQ, GBS, total, seed=7,
                               cache_dir=str(tmp_path / "cache"))


def _run(source, start, end):
    return [source.batch(s, GBS)["tokens"] for s in range(start, end, GBS)]


def test_phase_switches_at_its_sample_budget(prefixes, tmp_path):
    src = _source(prefixes, 24, tmp_path)
    assert src.budgets == [8, 12]
    tokens = torch.cat(_run(src, 0, 24))
    assert tokens[:8].max() < 200 and tokens[8:].min() >= 200  # phase 2 reads only source c
    assert [src.phase(c) for c in (0, 4, 8, 12, 20)] == ["p1", "p1", "p1", "p2", "p2"]
    assert src.samples_per_phase(12) == {"p1": 8, "p2": 4}


def test_interrupted_and_uninterrupted_runs_read_the_same_samples(prefixes, tmp_path):
    whole = torch.cat(_run(_source(prefixes, 24, tmp_path), 0, 24))
    for stop in (4, 8, 12):  # mid-phase, exactly at the boundary, mid-phase 2
        first = _run(_source(prefixes, 24, tmp_path), 0, stop)
        rest = _run(_source(prefixes, 24, tmp_path), stop, 24)  # a fresh process resumes
        assert torch.equal(torch.cat(first + rest), whole)


def test_phase_order_does_not_depend_on_run_length(prefixes, tmp_path):
    short = torch.cat(_run(_source(prefixes, 12, tmp_path), 0, 12))
    long = torch.cat(_run(_source(prefixes, 20, tmp_path), 0, 12))
    assert torch.equal(short, long)


def test_resume_with_a_different_schedule_is_refused(prefixes, tmp_path):
    class FakeTrainer:
        consumed_samples = 8
        extra_state = {PhaseCallback.KEY: "0123456789abcdef"}

    cb = PhaseCallback(_source(prefixes, 24, tmp_path))
    with pytest.raises(ValueError, match="different phase schedule"):
        cb.on_train_start(FakeTrainer())
    FakeTrainer.extra_state = {PhaseCallback.KEY: cb.source.fingerprint()}
    cb.on_train_start(FakeTrainer())  # the same schedule resumes


@pytest.mark.parametrize("text, message", [
    ("phases: []", "non-empty 'phases' list"),
    ("phases: [{name: a, tokens: 10}]", "missing data_path"),
    ("phases: [{name: a, tokens: -1, data_path: [x]}]", "tokens=-1 must be a positive integer"),
    ("phases: [{name: a, tokens: 5, data_path: [x]}, {name: a, tokens: 5, data_path: [x]}]",
     "repeats"),
    ("phases: [{name: a, tokens: 5, data_path: [0.5, x, y]}]", "mixes weights and prefixes"),
    ("format: other/2\nphases: [{name: a, tokens: 5, data_path: [x]}]", "is not"),
])
def test_bad_blend_files_are_rejected(tmp_path, text, message):
    path = tmp_path / "blend.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_blend(str(path))


def test_trainer_resumed_at_the_phase_boundary_matches_uninterrupted(embedded_dir, tmp_path):
    """End to end: 6 iterations with the switch after 3, vs the same run resumed at iteration 3."""
    from megatron_rlp.train import main

    emb = os.path.join(embedded_dir, "embedded_text_document")
    val = os.path.join(embedded_dir, "embedded_valid_text_document")
    blend_file = tmp_path / "blend.yaml"
    # TINY_MODEL_FLAGS: seq 64, micro-batch 4 -> 256 tokens per iteration.
    blend_file.write_text(f"phases:\n  - {{name: diverse, tokens: 768, data_path: [{emb}]}}\n"
                          f"  - {{name: quality, tokens: 768, data_path: [0.5, {emb}, 0.5, {val}]}}\n")
    flags = TINY_MODEL_FLAGS + ["--embedded-data-dir", embedded_dir, "--data-phases",
                                str(blend_file), "--train-iters", "6"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(flags + ["--save", a, "--save-interval", "3"]) == 0
    ma = read_metrics(a)
    assert [r["phase"] for r in ma] == ["diverse"] * 3 + ["quality"] * 3
    assert ma[-1]["samples_diverse"] == 12 and ma[-1]["samples_quality"] == 12

    os.makedirs(b)  # b starts from a's checkpoint at the boundary (iteration 3)
    shutil.copytree(os.path.join(a, "iter_0000003"), os.path.join(b, "iter_0000003"))
    with open(os.path.join(b, "latest"), "w") as f:
        f.write("3")
    assert main(flags + ["--save", b, "--load", b]) == 0
    mb = read_metrics(b)
    assert [r["iteration"] for r in mb] == [4, 5, 6]
    assert [r["phase"] for r in mb] == ["quality"] * 3
    assert [r["loss"] for r in mb] == [r["loss"] for r in ma[3:]]
