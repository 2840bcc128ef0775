"""Quality scoring (megatron_rlp/data/quality.py) and tools/estimate_quality.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_rlp.data import quality
from megatron_rlp.data.corpus import generate_corpus, write_jsonl
from megatron_rlp.data.indexed import read_indexed_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _examples(seed, n=300):
    docs = generate_corpus(n, seed)
    return ([d["text"] for d in docs if d["quality"] == "high"],
            [d["text"] for d in docs if d["quality"] == "low"])


def test_classifier_separates_held_out_high_and_low_documents():
    high, low = _examples(1)
    clf = quality.NgramQualityClassifier(n_features=2 ** 16).fit(high, low)
    test_high, test_low = _examples(2, 200)
    assert np.mean(clf.score(test_high) > 0.5) > 0.95
    assert np.mean(clf.score(test_low) < 0.5) > 0.95


def test_classifier_round_trips_through_npz_without_pickle(tmp_path):
    high, low = _examples(1, 100)
    clf = quality.NgramQualityClassifier(n_features=2 ** 12).fit(high, low)
    clf.save(str(tmp_path / "c.npz"))
    again = quality.NgramQualityClassifier.load(str(tmp_path / "c.npz"))
    assert np.array_equal(clf.score(high[:5]), again.score(high[:5]))


def test_perplexity_matches_a_direct_computation_and_ignores_padding():
    torch.manual_seed(0)
    table = torch.randn(50, 50)
    model = lambda ids: table[ids]  # noqa: E731  (logits depend on the current token only)
    docs = [[1, 2, 3, 4, 5], [7, 8], [9]]
    ppl = quality.perplexities(model, docs, max_tokens=4, batch_size=2)
    logp = torch.log_softmax(table, -1)
    want0 = float(torch.exp(-torch.stack([logp[a, b] for a, b in [(1, 2), (2, 3), (3, 4)]]).mean()))
    assert ppl[0] == pytest.approx(want0, rel=1e-5)  # truncated to 4 tokens
    assert ppl[1] == pytest.approx(float(torch.exp(-logp[7, 8])), rel=1e-5)
    assert np.isnan(ppl[2])  # one token: nothing to predict


def test_tiers_follow_thresholds_in_both_directions():
    assert quality.assign_tiers([0.9, 0.5, 0.1, float("nan")], 0.8, 0.2) == \
        ["high", "medium", "low", "low"]
    assert quality.assign_tiers([3.0, 10.0, 50.0], 5.0, 20.0, higher_is_better=False) == \
        ["high", "medium", "low"]
    with pytest.raises(ValueError, match="high threshold must be the higher"):
        quality.assign_tiers([0.5], 0.2, 0.8)


def _tool(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "estimate_quality.py"),
                           *args], capture_output=True, text=True, timeout=120)


def test_tool_writes_tiers_manifest_scores_and_summary(tmp_path):
    write_jsonl(generate_corpus(300, 5), str(tmp_path / "docs.jsonl"))
    high, low = _examples(1)
    (tmp_path / "high.txt").write_text("\n".join(t.replace("\n", " ") for t in high))
    write_jsonl([{"text": t} for t in low], str(tmp_path / "low.jsonl.gz"))
    out = tmp_path / "out"
    r = _tool("--input", str(tmp_path / "docs.jsonl"), "--output-dir", str(out),
              "--high-examples", str(tmp_path / "high.txt"),
              "--low-examples", str(tmp_path / "low.jsonl.gz"), "--append-eod",
              "--category", "algebra=math", "--n-features", "4096")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())["sources"]
    names = {e["name"] for e in manifest}
    assert {"algebra_high", "web_low"} <= names
    assert next(e for e in manifest if e["name"] == "algebra_high")["category"] == "math"
    for e in manifest:  # every .bin/.idx holds what the manifest says
        ds = read_indexed_dataset(str(out / e["path"]))
        assert len(ds) == e["documents"] and int(ds.sequence_lengths.sum()) == e["tokens"]
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 300 and all(0 <= s["classifier"] <= 1 for s in scores)
    summary = json.loads((out / "summary.json").read_text())
    assert sum(summary["classifier_histogram"]["counts"]) == 300
    assert summary["agreement_with_quality_field"]["accuracy"] > 0.75  # medium documents are the errors
    assert not [f for f in os.listdir(out) if ".tmp-" in f]


@pytest.mark.parametrize("args, message", [
    (["--high-examples", "h.txt"], "go together"),
    ([], "needs --high-examples"),
    (["--scorer", "perplexity"], "needs --load"),
    (["--high-examples", "h.txt", "--low-examples", "h.txt", "--tier-thresholds", "0.1", "0.9"],
     "high threshold must be the higher"),
])
def test_tool_rejects_bad_arguments_before_writing(tmp_path, args, message):
    (tmp_path / "docs.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "h.txt").write_text("x\n")
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "estimate_quality.py"),
                        "--input", "docs.jsonl", "--output-dir", "out", *args],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr
    assert not (tmp_path / "out").exists()
