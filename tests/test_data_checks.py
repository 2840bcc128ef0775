"""Data checked up front: token ids against the vocabulary (once per file), phase blend weights and
budgets, unreached phases, and prompts longer than the model's context."""
import os

import numpy as np
import pytest

from conftest import TINY_MODEL_FLAGS
from megatron_rlp.data import token_range
from megatron_rlp.data.indexed import write_indexed_dataset
from megatron_rlp.data.phases import Phase, build_phased_source, load_blend
from megatron_rlp.data.tokenizer import build_tokenizer

VOCAB = 1024  # the embedded tokenizer


def _docs(seed, count=40, top=VOCAB):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, top, 50) for _ in range(count)]


def _error_lines(text):
    return [line for line in text.splitlines() if "error" in line.lower()]


def test_token_id_beyond_the_vocabulary_stops_the_run_in_one_line(tmp_path, capsys):
    # Before: an IndexError traceback when a sample holding the id was drawn, exit 0 otherwise.
    from megatron_rlp.train import main

    docs = _docs(0)
    docs[17][5] = 1500
    prefix = write_indexed_dataset(str(tmp_path / "bad_text_document"), docs, dtype=np.uint16)
    code = main(TINY_MODEL_FLAGS + ["--data-path", prefix, "--train-iters", "1"])
    errors = _error_lines(capsys.readouterr().err)
    assert code == 2 and len(errors) == 1, errors
    assert errors[0] == (
        f"megatron-rlp-train: error: {prefix}.bin holds token id 1500 (ids span 0..1500) but the "
        f"tokenizer has {VOCAB} ids (0..{VOCAB - 1}); the data was built with another tokenizer: "
        "rebuild it with tools/preprocess_data.py and this run's --tokenizer-type/"
        "--tokenizer-model")


def test_token_range_is_scanned_once_per_file_and_again_after_it_changes(tmp_path, monkeypatch):
    prefix = write_indexed_dataset(str(tmp_path / "a"), _docs(1, top=600), dtype=np.uint16)
    cache = str(tmp_path / "cache")
    scans = []
    real = token_range.scan_token_range
    monkeypatch.setattr(token_range, "scan_token_range",
                        lambda *a: scans.append(a[0]) or real(*a))
    first = token_range.token_range(prefix, cache)
    again = token_range.token_range(prefix, cache)
    assert len(scans) == 1 and again == first and first["max"] <= 599
    token_range.check_token_ids([prefix], VOCAB, cache)  # fits: no error, no scan
    token_range.token_range(prefix, str(tmp_path / "another_run_cache"))  # kept beside the data
    assert len(scans) == 1

    write_indexed_dataset(prefix, _docs(2) + [[2000]], dtype=np.uint16)  # rebuilt in place
    assert token_range.token_range(prefix, cache)["max"] == 2000 and len(scans) == 2
    with pytest.raises(ValueError, match=r"a\.bin holds token id 2000 .* has 1024 ids"):
        token_range.check_token_ids([prefix], VOCAB, cache)


def test_scan_reads_in_bounded_chunks_and_finds_both_extremes(tmp_path, monkeypatch):
    monkeypatch.setattr(token_range, "CHUNK_BYTES", 6)  # three uint16 ids per read
    ids = np.array([7, 9, 3, 11, 5, 2, 8, 900], dtype=np.uint16)
    path = tmp_path / "x.bin"
    ids.tofile(path)
    assert token_range.scan_token_range(str(path), np.dtype(np.uint16)) == (2, 900)
    empty = tmp_path / "e.bin"
    empty.write_bytes(b"")
    assert token_range.scan_token_range(str(empty), np.dtype(np.int32)) == (None, None)


def test_negative_ids_in_a_signed_file_are_refused(tmp_path):
    prefix = write_indexed_dataset(str(tmp_path / "neg"), _docs(3), dtype=np.int32)
    with open(prefix + ".bin", "r+b") as f:  # damaged after writing: the writer refuses negatives
        f.write(np.array([-4], dtype=np.int32).tobytes())
    with pytest.raises(ValueError, match=r"neg\.bin holds token id -4 \(ids span -4\.\.\d+\)"):
        token_range.check_token_ids([prefix], VOCAB)


@pytest.mark.parametrize("weight", ["0", "-0.5", ".nan", ".inf"])
def test_blend_weights_that_are_not_positive_and_finite_are_refused(tmp_path, weight):
    path = tmp_path / "blend.yaml"
    path.write_text(f"phases: [{{name: a, tokens: 512, data_path: [{weight}, x, 1, y]}}]\n")
    with pytest.raises(ValueError, match=r"phases\[0\]: data_path: --data-path weight .* must be "
                                         "a finite number > 0"):
        load_blend(str(path))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("phase_sources")
    return [write_indexed_dataset(str(d / n), _docs(k), dtype=np.uint16)
            for k, n in enumerate("ab")]


def test_phase_budget_below_one_optimizer_step_is_refused(sources, tmp_path):
    # Before: silently rounded up to one step (here 256 tokens for a budget of 100).
    phases = [Phase("warmup", 100, [sources[0]]), Phase("main", 4096, [sources[1]])]
    with pytest.raises(ValueError, match=r"phase 'warmup': tokens=100 is less than one optimizer "
                                         r"step \(256 tokens = --seq-length 64 x global batch 4\)"):
        build_phased_source(phases, build_tokenizer(), 64, 4, 16, seed=0,
                            cache_dir=str(tmp_path / "cache"))


def test_unnormalised_weights_and_unreached_phases_are_noted(sources, tmp_path):
    phases = [Phase("p1", 512, ["2", sources[0], "1", sources[1]]),
              Phase("p2", 512, ["0.5", sources[0], "0.5", sources[1]]),
              Phase("p3", 512, [sources[1]])]
    source = build_phased_source(phases, build_tokenizer(), 64, 4, 12, seed=0,
                                 cache_dir=str(tmp_path / "cache"))
    assert source.notes(12, 4) == [
        "note: --data-phases phase 'p1': blend weights sum to 3, not 1; they are normalised to "
        "0.6667, 0.3333",
        "note: --data-phases phase 'p3' is never reached: it starts at sample 16 and this run "
        "reads 12 samples; --train-iters 5 or more reaches it"]
    assert source.notes(20, 4)[1:] == []  # every phase reached


def test_training_start_up_prints_the_phase_notes(embedded_dir, tmp_path, capsys):
    # Before: the weights were normalised silently and the unreached phase was never mentioned.
    from megatron_rlp.train import main

    emb = os.path.join(embedded_dir, "embedded_text_document")
    val = os.path.join(embedded_dir, "embedded_valid_text_document")
    blend = tmp_path / "blend.yaml"
    blend.write_text(f"phases:\n  - {{name: first, tokens: 512, data_path: [3, {emb}, 1, {val}]}}\n"
                     f"  - {{name: later, tokens: 512, data_path: [{emb}]}}\n")
    code = main(TINY_MODEL_FLAGS + ["--embedded-data-dir", embedded_dir, "--data-phases",
                                    str(blend), "--train-iters", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert ("note: --data-phases phase 'first': blend weights sum to 4, not 1; they are "
            "normalised to 0.75, 0.25") in out
    assert ("note: --data-phases phase 'later' is never reached: it starts at sample 8 and this "
            "run reads 8 samples; --train-iters 3 or more reaches it") in out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A weights-only checkpoint of the tiny model (--seq-length 64), no training."""
    from megatron_rlp.config import parse_args
    from megatron_rlp.hf.import_ import save_weights_checkpoint
    from megatron_rlp.models.hybrid import build_model
    from megatron_rlp.training.distributed import destroy_distributed, init_distributed

    root = str(tmp_path_factory.mktemp("ckpt"))
    cfg = parse_args(TINY_MODEL_FLAGS)
    init_distributed(cfg.parallel, 0)
    save_weights_checkpoint(build_model(cfg, VOCAB), cfg.to_flat_dict(), root, stage="pretrain")
    destroy_distributed()
    return root


def test_prompt_longer_than_the_context_is_refused_in_one_line(ckpt, capsys):
    # Before: a 100-token prompt for a 64-token model generated without a word.
    from megatron_rlp.generate import main

    prompt = "12 + 7 = 19. " * 12
    n = len(build_tokenizer().encode(prompt))
    assert n > 64
    code = main(["--load", ckpt, "--prompt", prompt, "--max-new-tokens", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(_error_lines("\n".join(err))) == 1
    assert err[-1] == (f"megatron-rlp-generate: error: --prompt is {n} tokens, longer than the "
                       "model's --seq-length 64 (the longest context it was trained on); "
                       "shorten it")


def test_generation_running_past_the_context_is_noted(ckpt, capsys):
    from megatron_rlp.generate import main

    code = main(["--load", ckpt, "--prompt", "12+7=", "--max-new-tokens", "62",
                 "--temperature", "0", "--no-stop-at-eod"])
    captured = capsys.readouterr()
    assert code == 0 and captured.out.startswith("12+7=")
    assert "runs past the model's --seq-length 64" in captured.err


def test_a_pickle_in_the_dataset_index_cache_is_refused_before_megatron_reads_it(tmp_path):
    import pickle

    import numpy as np

    from megatron_rlp.data.datasets import refuse_object_arrays

    marker = tmp_path / "ran"
    cache = tmp_path / "cache" / "GPTDataset_indices"
    cache.mkdir(parents=True)
    np.save(cache / "good-document_index.npy", np.arange(10, dtype=np.int32))
    refuse_object_arrays(str(tmp_path / "cache"))  # plain integer indices pass

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(cache / "evil-document_index.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "|O", "fortran_order": False, "shape": (1,)})
        pickle.dump(np.array([Payload()], dtype=object), f)
    with pytest.raises(ValueError, match="evil-document_index.npy holds pickled Python objects"):
        refuse_object_arrays(str(tmp_path / "cache"))
    assert not marker.exists()
