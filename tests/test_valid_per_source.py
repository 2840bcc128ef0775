"""Validation per source: `valid_loss/<source>` beside the blended `valid_loss`, names from the
blend's paths or the --data-phases table, numbers equal to evaluating each source alone, and the
same after a resume."""
import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO_ROOT, TINY_MODEL_FLAGS, read_metrics
from megatron_rlp.data.blend import source_names
from megatron_rlp.data.indexed import write_indexed_dataset
from megatron_rlp.data.phases import load_valid_sources
from megatron_rlp.data.tokenizer import build_tokenizer
from megatron_rlp.data.validation import validation_split
from megatron_rlp.data.sources import DatasetSource, ValidationSource

VALID_KEYS = ("valid_loss", "valid_loss/web", "valid_loss/noise")


# ---------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("prefixes, names", [
    (["/d/tiers/web_low_text_document", "/d/tiers/math_high_text_document"],
     ["web_low", "math_high"]),
    (["/d/v1/web_text_document", "/d/v2/web_text_document", "/d/v2/math_text_document"],
     ["v1/web_text_document", "v2/web_text_document", "math"]),
    (["/d/a/x_text_document", "/d/a/x_code_document"], ["x_text_document", "x_code_document"]),
    (["/d/web", "/e/web_text_document"], ["web", "web_text_document"]),
    (["/d/text_document", "/d/plain"], ["text_document", "plain"]),
    (["/d/a b_text_document"], ["a_b"]),
    (["/d/a b", "/d/a_b"], ["d/a_b-1", "d/a_b-2"]),
])
def test_source_names_are_file_stems_made_unique_by_folders(prefixes, names):
    assert source_names(prefixes) == names


def test_a_prefix_named_twice_is_rejected():
    with pytest.raises(ValueError, match="listed twice"):
        source_names(["/d/web_text_document", "/d/x/../web_text_document"])


def _cfg(data_phases=None, valid_data_path=()):
    return SimpleNamespace(phases=SimpleNamespace(data_phases=data_phases),
                           data=SimpleNamespace(valid_data_path=list(valid_data_path)))


def test_valid_data_path_gives_one_source_per_distinct_prefix(tmp_path):
    a, b = str(tmp_path / "web_text_document"), str(tmp_path / "math_text_document")
    blend_path, sources = validation_split(_cfg(), ["0.3", a, "0.5", b, "0.2", a])
    assert blend_path == ["0.3", a, "0.5", b, "0.2", a]  # the blend keeps its weights
    assert sources == [("web", a, ()), ("math", b, ())]


# ------------------------------------------------------------------------- --data-phases table
def _blend_file(path, table):
    path.write_text("phases:\n"
                    "  - {name: diverse, tokens: 512, data_path: [emb]}\n"
                    "  - {name: focused, tokens: 512, data_path: [0.5, emb, 0.5, noise]}\n"
                    + table)
    return str(path)


def test_blend_file_valid_paths_are_named_as_its_table_names_them(tmp_path):
    blend = _blend_file(tmp_path / "blend.yaml",
                        "sources:\n"
                        "  web: {path: emb.bin, valid_path: held/emb_valid}\n"
                        "  noise: {path: noise, valid_path: /abs/noise_valid.idx, tier: low}\n"
                        "  unused: {path: other, valid_path: other_valid}\n"
                        "  no_holdout: {path: emb2, tier: high}\n")
    got = load_valid_sources(blend)
    assert [(v.name, v.prefix, v.phases) for v in got] == [
        ("web", str(tmp_path / "held" / "emb_valid"), ("diverse", "focused")),
        ("noise", "/abs/noise_valid", ("focused",)),
        ("unused", str(tmp_path / "other_valid"), ()),
    ]
    blend_path, sources = validation_split(_cfg(blend), ["ignored_embedded_valid"])
    assert blend_path == [v.prefix for v in got]
    assert [name for name, _, _ in sources] == ["web", "noise", "unused"]


def test_a_blend_file_without_valid_paths_leaves_validation_to_valid_data_path(tmp_path):
    blend = _blend_file(tmp_path / "blend.yaml", "sources:\n  web: {path: emb, tier: high}\n")
    assert load_valid_sources(blend) == []
    valid = str(tmp_path / "embedded_valid_text_document")
    assert validation_split(_cfg(blend), [valid])[1] == [("embedded_valid", valid, ())]


@pytest.mark.parametrize("table, message", [
    ("sources: [web]\n", "'sources' must map each source's name"),
    ("sources:\n  web: {path: emb, valid_path: 3}\n", r"sources.web: valid_path=3 must be"),
    ("sources:\n  a: {path: emb, valid_path: v}\n  b: {path: noise, valid_path: v.bin}\n",
     "also the valid_path of 'a'"),
])
def test_bad_valid_path_entries_are_rejected(tmp_path, table, message):
    with pytest.raises(ValueError, match=message):
        load_valid_sources(_blend_file(tmp_path / "blend.yaml", table))


def test_valid_data_path_beside_blend_file_valid_paths_is_refused(tmp_path):
    blend = _blend_file(tmp_path / "blend.yaml",
                        "sources:\n  web: {path: emb, valid_path: emb_valid}\n")
    with pytest.raises(ValueError, match="--valid-data-path and the valid_path entries of "
                                         "--data-phases .* both give the validation split"):
        validation_split(_cfg(blend, ["/x/valid_text_document"]), ["/x/valid_text_document"])


def _load_script(*path):
    spec = importlib.util.spec_from_file_location(path[-1][:-3], os.path.join(REPO_ROOT, *path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tier_manifest(folder, names):
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    entries = []
    for name, tier in names:
        write_indexed_dataset(os.path.join(folder, f"{name}_text_document"),
                              [rng.integers(0, 100, 200) for _ in range(10)], dtype=np.uint16)
        entries.append({"name": name, "category": name.split("_")[0], "tier": tier,
                        "tokens": 2000, "path": f"{name}_text_document"})
    path = os.path.join(folder, "manifest.json")
    with open(path, "w") as f:
        json.dump({"sources": entries}, f)
    return path


def test_blend_builder_gives_each_held_out_source_its_valid_path(tmp_path, capsys):
    train = _tier_manifest(str(tmp_path / "tiers"), [("math_high", "high"), ("web_low", "low"),
                                                     ("web_medium", "medium")])
    held = _tier_manifest(str(tmp_path / "held"), [("math_high", "high"), ("web_low", "low"),
                                                   ("code_high", "high")])
    out = str(tmp_path / "blend" / "two_phase.yaml")
    tool = _load_script("tools", "build_phase_blend.py")
    assert tool.main(["--manifest", train, "--valid-manifest", held, "--total-tokens", "2000",
                      "--output", out]) == 0
    printed = capsys.readouterr().out
    assert "'code_high' is not in --manifest; left out" in printed
    assert "no held-out 'web_medium'" in printed
    got = load_valid_sources(out)
    assert [(v.name, v.prefix, v.phases) for v in got] == [
        ("math_high", str(tmp_path / "held" / "math_high_text_document"), ("phase1", "phase2")),
        ("web_low", str(tmp_path / "held" / "web_low_text_document"), ("phase1",)),
    ]


# --------------------------------------------------------------------------- the trainer's side
def test_every_source_is_evaluated_and_a_one_source_split_only_once():
    from megatron_rlp.training.trainer import PretrainStage, Trainer

    calls = []

    def evaluate(stage):
        calls.append(stage.data_source)
        return float(len(calls))

    data = [{"tokens": [0], "labels": [0], "loss_mask": [1.0]}]
    web, noise = DatasetSource(data), DatasetSource(data)
    split = ValidationSource(data, {"web": web, "noise": noise})
    trainer = SimpleNamespace(cfg=None, evaluate=evaluate, valid_source=PretrainStage(None, split))
    assert Trainer.validation_losses(trainer) == {
        "valid_loss": 1.0, "valid_loss/web": 2.0, "valid_loss/noise": 3.0}
    assert calls == [split, web, noise]

    calls.clear()
    trainer.valid_source = PretrainStage(None, ValidationSource.of_one_source("web", data))
    assert Trainer.validation_losses(trainer) == {"valid_loss": 1.0, "valid_loss/web": 1.0}
    assert len(calls) == 1


# ---------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def noise_prefixes(tmp_path_factory):
    """A second source unlike the embedded corpus: uniformly random token ids."""
    folder = tmp_path_factory.mktemp("noise")
    vocab = build_tokenizer().vocab_size
    rng = np.random.default_rng(0)
    return {split: write_indexed_dataset(
        str(folder / f"noise_{split}_text_document"),
        [rng.integers(0, vocab, rng.integers(20, 60)) for _ in range(60)])
        for split in ("train", "valid")}


def _train(flags):
    """megatron_rlp.train.main in this process; returns its stdout."""
    from megatron_rlp.train import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(flags) == 0
    return out.getvalue()


def _phased_flags(embedded_dir, noise, folder, table):
    emb = os.path.join(embedded_dir, "embedded_text_document")
    held = os.path.join(embedded_dir, "embedded_valid_text_document")
    blend = folder / "blend.yaml"
    # TINY_MODEL_FLAGS: 256 tokens per iteration, so the phases switch after iteration 2.
    blend.write_text(
        "phases:\n"
        f"  - {{name: diverse, tokens: 512, data_path: [{emb}]}}\n"
        f"  - {{name: focused, tokens: 512, data_path: [0.5, {emb}, 0.5, {noise['train']}]}}\n"
        "sources:\n" + "".join(
            f"  {name}: {{path: {train}, valid_path: {valid}}}\n" for name, train, valid in
            [("web", emb, held), ("noise", noise["train"], noise["valid"])] if name in table))
    return TINY_MODEL_FLAGS + ["--embedded-data-dir", embedded_dir, "--data-phases", str(blend),
                               "--train-iters", "4", "--eval-interval", "2", "--eval-iters", "2"]


@pytest.fixture(scope="module")
def phased_run(embedded_dir, noise_prefixes, tmp_path_factory):
    """4 iterations, two phases, validation on both sources every 2 iterations, saved at 2."""
    folder = tmp_path_factory.mktemp("phased")
    flags = _phased_flags(embedded_dir, noise_prefixes, folder, ("web", "noise"))
    save = str(folder / "run")
    stdout = _train(flags + ["--save", save, "--save-interval", "2"])
    return SimpleNamespace(flags=flags, save=save, stdout=stdout, records=read_metrics(save))


def test_metrics_and_progress_line_show_each_source_beside_the_blend(phased_run):
    by_iteration = {r["iteration"]: r for r in phased_run.records}
    uniform = math.log(build_tokenizer().vocab_size)
    for iteration in (2, 4):
        record = by_iteration[iteration]
        assert all(math.isfinite(record[key]) for key in VALID_KEYS), record
        # Uniformly random tokens: no model beats their entropy log(vocab) (Gibbs' inequality;
        # the margin is the sampling error of 512 tokens).
        assert record["valid_loss/noise"] > uniform - 0.25
    # The text source is learnt from the first iterations on.
    assert by_iteration[4]["valid_loss/web"] < by_iteration[2]["valid_loss/web"] - 0.05
    assert not any(key.startswith("valid_loss") for key in by_iteration[3])
    lines = {int(line.split()[1].split("/")[0]): line
             for line in phased_run.stdout.splitlines() if line.startswith("iter ")}
    assert "| valid_loss/web " in lines[2] and "| valid_loss/noise " in lines[4]
    assert "valid_loss" not in lines[3]
    # Start-up: one line per source, with the phases that train on it.
    assert "trained in diverse, focused" in phased_run.stdout
    assert "trained in focused" in phased_run.stdout


def test_each_source_loss_equals_that_source_evaluated_alone(phased_run, embedded_dir,
                                                             noise_prefixes, tmp_path):
    """Reference: the same run validating on the web source only (a one-source split)."""
    flags = _phased_flags(embedded_dir, noise_prefixes, tmp_path, ("web",))
    _train(flags + ["--save", str(tmp_path / "web_only")])
    alone = {r["iteration"]: r for r in read_metrics(str(tmp_path / "web_only"))}
    for record in phased_run.records:
        if "valid_loss" in record:
            assert alone[record["iteration"]]["valid_loss"] == record["valid_loss/web"]
            assert alone[record["iteration"]]["valid_loss/web"] == record["valid_loss/web"]
            assert "valid_loss/noise" not in alone[record["iteration"]]


def test_per_source_losses_after_a_resume_equal_the_uninterrupted_run(phased_run, tmp_path):
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(phased_run.save, "iter_0000002"),
                    os.path.join(resumed, "iter_0000002"))
    with open(os.path.join(resumed, "latest"), "w") as f:
        f.write("2")
    _train(phased_run.flags + ["--save", resumed, "--load", resumed])
    got = read_metrics(resumed)
    assert [r["iteration"] for r in got] == [3, 4]
    expected = phased_run.records[3]
    assert {key: got[1][key] for key in VALID_KEYS} == {key: expected[key] for key in VALID_KEYS}


def test_demo_plot_draws_the_blend_and_every_source(phased_run, tmp_path):
    plot = _load_script("examples", "plot_metrics.py")
    runs = [("run", phased_run.records)]
    assert plot.panel_keys("valid_loss/*", runs) == list(VALID_KEYS)
    assert plot.panel_keys("reward_mean/*", runs) == []
    # 256 tokens per iteration: the 512-token first phase ends after iteration 2.
    assert plot.phase_switches(phased_run.records) == [(2.0, "focused")]
    out = str(tmp_path / "loss.png")
    plot.main([os.path.join(phased_run.save, "metrics.jsonl"), "--out", out])
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
