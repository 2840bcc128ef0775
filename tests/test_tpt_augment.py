"""tools/tpt_augment.py (and estimate_quality's perplexity scorer) on a tiny checkpoint."""
import json
import os
import subprocess
import sys

import pytest

from conftest import TINY_MODEL_FLAGS
from megatron_rlp.data.corpus import generate_corpus, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(embedded_dir, tmp_path_factory):
    from megatron_rlp.train import main

    save = str(tmp_path_factory.mktemp("tpt_ckpt"))
    assert main(TINY_MODEL_FLAGS + ["--embedded-data-dir", embedded_dir, "--train-iters", "2",
                                    "--save", save]) == 0
    return save


def _run(tool, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", tool), *args],
                          capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, TORCHDYNAMO_DISABLE="1"))


def test_augmented_documents_keep_fields_and_append_thinking(checkpoint, tmp_path):
    docs = generate_corpus(3, 11)
    write_jsonl(docs, str(tmp_path / "in.jsonl"))
    out = tmp_path / "out.jsonl"
    r = _run("tpt_augment.py", "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
             "--load", checkpoint, "--max-doc-tokens", "12", "--max-new-tokens", "6",
             "--temperature", "1.0", "--top-p", "0.9", "--output-template",
             "{document} [think] {thinking}")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["id"] for x in rows] == [d["id"] for d in docs]
    for row, doc in zip(rows, docs):
        assert row["source"] == doc["source"] and row["quality"] == doc["quality"]
        head, sep, thinking = row["text"].partition(" [think] ")
        assert sep and thinking == row["thinking"]
        assert doc["text"].startswith(head) and len(head) < len(doc["text"])  # truncated


def test_tpt_rejects_template_without_placeholder(checkpoint, tmp_path):
    write_jsonl(generate_corpus(1, 11), str(tmp_path / "in.jsonl"))
    r = _run("tpt_augment.py", "--input", str(tmp_path / "in.jsonl"), "--output",
             str(tmp_path / "o.jsonl"), "--load", checkpoint, "--prompt-template", "no slot")
    assert r.returncode == 2 and "{document}" in r.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_perplexity_scorer_tiers_documents_under_a_checkpoint(checkpoint, tmp_path):
    write_jsonl(generate_corpus(20, 3), str(tmp_path / "docs.jsonl"))
    out = tmp_path / "out"
    r = _run("estimate_quality.py", "--input", str(tmp_path / "docs.jsonl"), "--output-dir",
             str(out), "--load", checkpoint, "--scorer", "perplexity",
             "--tier-thresholds", "100", "400", "--perplexity-max-tokens", "32")
    assert r.returncode == 0, r.stderr
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert all(s["perplexity"] > 1 for s in scores)
    for s in scores:
        want = "high" if s["perplexity"] <= 100 else "low" if s["perplexity"] > 400 else "medium"
        assert s["tier"] == want
