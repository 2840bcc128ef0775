"""Indexed writing, the embedded dataset and megatron-core pretraining datasets."""
import os

import numpy as np
import pytest
import torch

from megatron_rlp.data.datasets import build_pretraining_dataset, parse_data_path
from megatron_rlp.data.embedded import embedded_paths, ensure_embedded_dataset
from megatron_rlp.data.indexed import read_indexed_dataset, write_indexed_dataset
from megatron_rlp.data.tokenizer import build_tokenizer

SEQ = 32


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("EmbeddedTokenizer")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded")
    ensure_embedded_dataset(str(out), num_docs=600, seed=5)
    return embedded_paths(str(out))


# ---- indexed ------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_id, dtype", [(1023, np.uint16), (70000, np.int32)])
def test_indexed_dataset_reads_written_documents_exactly(tmp_path, top_id, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, top_id + 1, size=n).tolist() for n in (5, 1, 17, 300, 2)]
    docs[0][0] = top_id
    prefix = write_indexed_dataset(str(tmp_path / "d"), docs)
    ds = read_indexed_dataset(prefix)
    assert ds.index.dtype == dtype  # uint16 when every id fits, else int32
    assert len(ds) == len(docs)
    for i, doc in enumerate(docs):
        assert ds[i].tolist() == doc
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def test_failed_write_leaves_no_files_and_keeps_the_old_pair(tmp_path):
    prefix = write_indexed_dataset(str(tmp_path / "d"), [[1, 2, 3]], dtype=np.uint16)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 65535\]"):
        write_indexed_dataset(prefix, [[4, 5], [70000]], dtype=np.uint16)
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]
    ds = read_indexed_dataset(prefix)  # keep it alive: its __del__ unmaps what ds[0] views
    assert ds[0].tolist() == [1, 2, 3]


# ---- embedded -----------------------------------------------------------------------------------
def test_embedded_dataset_holds_the_corpus_tokens_with_eod(embedded, tokenizer):
    from megatron_rlp.data.corpus import generate_corpus
    from megatron_rlp.data.embedded import THINK_SHARE

    docs = generate_corpus(600, seed=5, think_share=THINK_SHARE)
    train, valid = read_indexed_dataset(embedded.train_prefix), \
        read_indexed_dataset(embedded.valid_prefix)
    assert (len(train), len(valid)) == (588, 12)  # the last num_docs // 50 are held out
    assert train[3].tolist() == tokenizer.encode(docs[3]["text"]) + [tokenizer.eod]
    assert valid[0].tolist() == tokenizer.encode(docs[588]["text"]) + [tokenizer.eod]
    for path in embedded.data_files() + [embedded.manifest]:
        assert os.path.isfile(path)


def test_embedded_dataset_is_not_rebuilt_when_up_to_date(embedded):
    before = {p: os.stat(p).st_mtime_ns for p in embedded.data_files()}
    assert ensure_embedded_dataset(embedded.out_dir, num_docs=600, seed=5) == embedded.train_prefix
    assert {p: os.stat(p).st_mtime_ns for p in embedded.data_files()} == before


def test_embedded_dataset_is_rebuilt_when_seed_changes_or_files_are_damaged(tmp_path):
    out = str(tmp_path)
    prefix = ensure_embedded_dataset(out, num_docs=100, seed=1)
    first = open(prefix + ".bin", "rb").read()
    ensure_embedded_dataset(out, num_docs=100, seed=2)
    assert open(prefix + ".bin", "rb").read() != first
    os.truncate(prefix + ".bin", 10)
    ensure_embedded_dataset(out, num_docs=100, seed=1)
    assert open(prefix + ".bin", "rb").read() == first


# ---- pretraining datasets ----------------------------------------------------------------------
def test_samples_have_megatron_shapes_and_labels_are_shifted_tokens(embedded, tokenizer, tmp_path):
    ds = build_pretraining_dataset([embedded.train_prefix], SEQ, 50, 1234, tokenizer,
                                   cache_dir=str(tmp_path))
    assert len(ds) >= 50
    for i in (0, 7, 49):
        s = ds[i]
        assert s["tokens"].shape == s["labels"].shape == s["loss_mask"].shape == (SEQ,)
        assert s["tokens"].dtype == s["labels"].dtype == s["position_ids"].dtype == torch.int64
        assert s["loss_mask"].dtype == torch.float32 and bool((s["loss_mask"] == 1).all())
        assert torch.equal(s["tokens"][1:], s["labels"][:-1])
        assert torch.equal(s["position_ids"], torch.arange(SEQ))
        assert s["dataset_id"] == 0
        assert int(s["tokens"].max()) < tokenizer.vocab_size
    # consecutive samples are shuffled across the corpus, not contiguous chunks
    assert not torch.equal(ds[0]["labels"][-1:], ds[1]["tokens"][:1]) or \
        not torch.equal(ds[1]["labels"][-1:], ds[2]["tokens"][:1])


def test_same_seed_gives_the_same_samples_with_or_without_the_cache(embedded, tokenizer, tmp_path):
    args = ([embedded.train_prefix], SEQ, 60, 99, tokenizer)
    a = build_pretraining_dataset(*args, cache_dir=str(tmp_path / "c1"))
    b = build_pretraining_dataset(*args, cache_dir=str(tmp_path / "c1"))  # cache hit
    c = build_pretraining_dataset(*args, cache_dir=str(tmp_path / "c2"))  # fresh build
    other = build_pretraining_dataset([embedded.train_prefix], SEQ, 60, 100, tokenizer,
                                      cache_dir=str(tmp_path / "c1"))
    for i in (0, 1, 30, 59):
        assert torch.equal(a[i]["tokens"], b[i]["tokens"])
        assert torch.equal(a[i]["tokens"], c[i]["tokens"])
    assert not all(torch.equal(a[i]["tokens"], other[i]["tokens"]) for i in range(10))
    assert any(f.endswith("shuffle_index.npy") for f in os.listdir(tmp_path / "c1"))


def test_data_rewritten_under_the_same_prefix_does_not_reuse_stale_indices(tmp_path, tokenizer):
    prefix = str(tmp_path / "d")
    cache = str(tmp_path / "cache")
    write_indexed_dataset(prefix, [[7] * 40, [8] * 40], dtype=np.uint16)
    old = build_pretraining_dataset([prefix], 8, 3, 0, tokenizer, cache_dir=cache)
    assert set(old[0]["tokens"].tolist()) <= {7, 8}
    write_indexed_dataset(prefix, [[9] * 30], dtype=np.uint16)
    new = build_pretraining_dataset([prefix], 8, 3, 0, tokenizer, cache_dir=cache)
    assert len(new) == (30 - 1) // 8  # one epoch of the new file
    assert all(set(new[i]["tokens"].tolist()) == {9} for i in range(len(new)))


def test_weighted_blend_draws_sources_in_proportion(embedded, tokenizer, tmp_path):
    ds = build_pretraining_dataset(["3", embedded.train_prefix, "1", embedded.valid_prefix],
                                   SEQ, 400, 7, tokenizer, cache_dir=str(tmp_path))
    # The small source's one epoch caps megatron's blend (ds.epoch_size samples, exactly 3:1);
    # further passes are permutations of it, so every whole pass keeps the proportion exactly
    # and a part of a pass only approximately.
    ids = [ds[i]["dataset_id"] for i in range(ds.epoch_size)]
    assert ids.count(1) == pytest.approx(ds.epoch_size / 4, abs=1)
    assert list(ds.draws_per_source(2 * ds.epoch_size)) == [2 * ids.count(0), 2 * ids.count(1)]
    ids = [ds[i]["dataset_id"] for i in range(400)]
    assert ids.count(1) == pytest.approx(100, abs=10)
    assert ds.prefixes == [embedded.train_prefix, embedded.valid_prefix]
    valid_tokens = read_indexed_dataset(embedded.valid_prefix)
    first_valid = next(i for i, d in enumerate(ids) if d == 1)
    assert int(ds[first_valid]["tokens"].max()) < tokenizer.vocab_size
    assert len(valid_tokens) == 12


def test_valid_split_uses_the_whole_given_prefix(embedded, tokenizer, tmp_path):
    ds = build_pretraining_dataset([embedded.valid_prefix], SEQ, 5, 1, tokenizer, split="valid",
                                   cache_dir=str(tmp_path))
    valid = read_indexed_dataset(embedded.valid_prefix)
    total = int(valid.sequence_lengths.sum())
    assert len(ds) == (total - 1) // SEQ  # one epoch, every token but the last as an input


def test_dataset_builds_under_an_initialised_process_group(embedded, tokenizer, tmp_path):
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ds = build_pretraining_dataset(["1", embedded.train_prefix, "1", embedded.valid_prefix],
                                       SEQ, 20, 3, tokenizer, cache_dir=str(tmp_path / "c"))
        assert len(ds) >= 20 and ds[19]["tokens"].shape == (SEQ,)
    finally:
        dist.destroy_process_group()


def test_missing_files_are_named_with_the_fix_before_any_work(tmp_path, tokenizer, embedded):
    (tmp_path / "half.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as e:
        build_pretraining_dataset(["1", embedded.train_prefix, "1", str(tmp_path / "half")],
                                  SEQ, 10, 0, tokenizer, cache_dir=str(tmp_path / "cache"))
    msg = str(e.value)
    assert f"{tmp_path}/half.idx" in msg and "half.bin" not in msg
    assert "tools/preprocess_data.py" in msg and "examples/demo.sh" in msg
    assert not (tmp_path / "cache").exists()


def test_foreign_index_file_is_rejected(tmp_path, tokenizer):
    (tmp_path / "x.bin").write_bytes(b"\x01\x00")
    (tmp_path / "x.idx").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="not a Megatron index file"):
        build_pretraining_dataset([str(tmp_path / "x")], SEQ, 10, 0, tokenizer)


@pytest.mark.parametrize("data_path, message", [
    ([], "--data-path is empty"),
    (["0.5", "a", "b"], "mixes weights and prefixes"),
    (["0", "a", "1", "b"], "must be a finite number > 0"),
    (["-1", "a", "2", "b"], "must be a finite number > 0"),
])
def test_malformed_data_path_is_rejected(data_path, message):
    with pytest.raises(ValueError, match=message):
        parse_data_path(data_path)


def test_data_path_forms_are_parsed():
    assert parse_data_path("a") == (["a"], None)
    assert parse_data_path(["a", "b.bin"]) == (["a", "b"], None)
    assert parse_data_path(["0.3", "a", "0.7", "b.idx"]) == (["a", "b"], [0.3, 0.7])


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "validation"}, "split 'validation' must be one of train, valid, test"),
    ({"seq_length": 0}, "--seq-length must be a positive int"),
    ({"num_samples": 0}, "num_samples must be a positive int"),
])
def test_bad_arguments_are_rejected(kwargs, message, tokenizer):
    args = dict(data_path=["a"], seq_length=SEQ, num_samples=10, seed=0, tokenizer=tokenizer)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        build_pretraining_dataset(**args)


def test_dataset_without_tokens_is_rejected_instead_of_looping(tmp_path, tokenizer):
    prefix = write_indexed_dataset(str(tmp_path / "empty"), [[]], dtype=np.uint16)
    with pytest.raises(ValueError, match="empty.bin holds no tokens"):
        build_pretraining_dataset([prefix], SEQ, 1, 0, tokenizer, cache_dir=str(tmp_path / "c"))


def test_tiny_dataset_is_repeated_over_epochs_to_fill_the_samples(tmp_path, tokenizer):
    prefix = write_indexed_dataset(str(tmp_path / "tiny"), [[5, 6, 7]])
    ds = build_pretraining_dataset([prefix], 4, 3, 0, tokenizer, cache_dir=str(tmp_path / "c"))
    assert len(ds) >= 3
    assert set(ds[2]["tokens"].tolist()) <= {5, 6, 7}
