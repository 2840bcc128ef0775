"""tools/preprocess_data.py: outputs, worker invariance, gzip, malformed lines, flags, empty
documents (Megatron-LM's rule), Parquet files and folders, damaged Parquet."""
import gzip
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_rlp.data.corpus import generate_corpus, write_jsonl
from megatron_rlp.data.indexed import import_indexed_dataset, read_indexed_dataset
from megatron_rlp.data.tokenizer import build_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "preprocess_data.py")


def _load_tool():
    # Registered under its own name so fork-started pool workers can unpickle its functions.
    spec = importlib.util.spec_from_file_location("preprocess_data", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["preprocess_data"] = module
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    docs = generate_corpus(300, seed=4)
    for i, d in enumerate(docs):
        d["title"] = f"document {i}"
    plain = write_jsonl(docs, str(folder / "docs.jsonl"))
    return docs, plain


def _run(tmp_path, *argv, capsys=None):
    rc = tool.main(list(argv))
    out = capsys.readouterr() if capsys else None
    return rc, out


def _read(prefix):
    return open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()


def test_output_holds_each_document_tokens_then_eod(corpus, tmp_path, capsys):
    docs, path = corpus
    rc, out = _run(tmp_path, "--input", path, "--output-prefix", str(tmp_path / "out"),
                   "--append-eod", capsys=capsys)
    assert rc == 0
    summary = json.loads(out.out.strip().splitlines()[-1])
    tok = build_tokenizer("EmbeddedTokenizer")
    expected = [tok.encode(d["text"]) + [tok.eod] for d in docs]
    ds = read_indexed_dataset(str(tmp_path / "out_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert summary["documents"] == 300 and summary["tokens"] == sum(map(len, expected))
    assert summary["skipped"] == 0
    assert sorted(os.listdir(tmp_path)) == ["out_text_document.bin", "out_text_document.idx"]


def test_two_workers_give_byte_identical_output_to_one(corpus, tmp_path, capsys):
    _, path = corpus
    for workers in ("1", "2"):
        rc, _ = _run(tmp_path, "--input", path, "--output-prefix", str(tmp_path / f"w{workers}"),
                     "--append-eod", "--workers", workers, "--chunk-lines", "7", capsys=capsys)
        assert rc == 0
    assert _read(str(tmp_path / "w1_text_document")) == _read(str(tmp_path / "w2_text_document"))


def test_gzip_input_gives_the_same_output_as_plain(corpus, tmp_path, capsys):
    docs, path = corpus
    gz = tmp_path / "docs.jsonl.gz"
    with open(path, "rb") as src, gzip.open(gz, "wb") as dst:
        dst.write(src.read())
    for name, inp in (("plain", path), ("gz", str(gz))):
        assert _run(tmp_path, "--input", inp, "--output-prefix", str(tmp_path / name),
                    capsys=capsys)[0] == 0
    assert _read(str(tmp_path / "plain_text_document")) == _read(str(tmp_path / "gz_text_document"))


def test_each_json_key_gets_its_own_output(corpus, tmp_path, capsys):
    docs, path = corpus
    rc, _ = _run(tmp_path, "--input", path, "--output-prefix", str(tmp_path / "k"),
                 "--json-keys", "text", "title", capsys=capsys)
    assert rc == 0
    tok = build_tokenizer("EmbeddedTokenizer")
    titles = read_indexed_dataset(str(tmp_path / "k_title_document"))
    assert len(titles) == 300 and titles[5].tolist() == tok.encode("document 5")


def test_hf_tokenizer_file_gives_the_same_output_as_the_embedded_type(corpus, tmp_path, capsys):
    _, path = corpus
    tj = tmp_path / "tokenizer.json"
    tj.write_text(build_tokenizer("EmbeddedTokenizer").hf_tokenizer_json(), encoding="utf-8")
    _run(tmp_path, "--input", path, "--output-prefix", str(tmp_path / "emb"), capsys=capsys)
    rc, _ = _run(tmp_path, "--input", path, "--output-prefix", str(tmp_path / "hf"),
                 "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tj),
                 capsys=capsys)
    assert rc == 0
    assert _read(str(tmp_path / "emb_text_document")) == _read(str(tmp_path / "hf_text_document"))


BAD_LINES = [
    (b'{"text": 5}', "key 'text' is of type int, not a string"),
    (b'{"text": "unterminated', "not valid JSON"),
    (b'["a list"]', "expected a JSON object, got list"),
    (b'{"body": "x"}', "key 'text' is missing"),
    (b'{"text": "\xff\xfe"}', "not valid JSON"),  # invalid UTF-8
]


@pytest.mark.parametrize("line, reason", BAD_LINES)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_malformed_line_fails_with_file_and_line_and_leaves_nothing(tmp_path, capsys, line,
                                                                    reason, workers):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'{"text": "a"}\n\n{"text": "b"}\n' + line + b'\n{"text": "c"}\n')
    rc, out = _run(tmp_path, "--input", str(inp), "--output-prefix",
                   str(tmp_path / "new" / "out"), "--workers", workers, "--chunk-lines", "2",
                   capsys=capsys)
    assert rc == 2
    assert f"{inp}:4: {reason}" in out.err and "--on-error skip" in out.err
    assert os.listdir(tmp_path) == ["in.jsonl"]  # not even the folder it created


def test_skip_drops_malformed_lines_reports_them_and_keeps_the_rest(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join([b'{"text": "one"}', BAD_LINES[0][0], b'{"text": "two"}',
                                BAD_LINES[1][0], b'{"text": "three"}']) + b"\n")
    rc, out = _run(tmp_path, "--input", str(inp), "--output-prefix", str(tmp_path / "out"),
                   "--on-error", "skip", "--append-eod", capsys=capsys)
    assert rc == 0
    assert f"{inp}:2: key 'text'" in out.err and f"{inp}:4: not valid JSON" in out.err
    assert json.loads(out.out.strip().splitlines()[-1])["skipped"] == 2
    tok = build_tokenizer("EmbeddedTokenizer")
    ds = read_indexed_dataset(str(tmp_path / "out_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == \
        [tok.encode(t) + [tok.eod] for t in ("one", "two", "three")]


@pytest.mark.parametrize("extra, message", [
    (["--workers", "0"], "--workers must be >= 1"),
    (["--json-keys", "text", "text"], "repeats a key"),
    (["--tokenizer-type", "HuggingFaceTokenizer"], "needs --tokenizer-model"),
    (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "/no/tok.json"],
     "no such file"),
])
def test_bad_arguments_fail_before_any_output(corpus, tmp_path, capsys, extra, message):
    _, path = corpus
    rc, out = _run(tmp_path, "--input", path, "--output-prefix", str(tmp_path / "o" / "x"),
                   *extra, capsys=capsys)
    assert rc == 2 and message in out.err
    assert os.listdir(tmp_path) == []


def test_missing_input_is_reported(tmp_path, capsys):
    rc, out = _run(tmp_path, "--input", str(tmp_path / "none.jsonl"), "--output-prefix",
                   str(tmp_path / "x"), capsys=capsys)
    assert rc == 2 and "none.jsonl': no such file or folder" in out.err


def test_command_line_help_lists_megatron_flags():
    out = subprocess.run([sys.executable, TOOL, "--help"], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    for flag in ("--input", "--output-prefix", "--json-keys", "--tokenizer-type",
                 "--tokenizer-model", "--workers", "--append-eod", "--on-error"):
        assert flag in out


# ---- empty documents: Megatron-LM's rule ------------------------------------------------------

def _megatron_reference(prefix, texts, append_eod):
    """The files Megatron-LM's tools/preprocess_data.py (core_v0.16.1) writes for `texts`, built
    its way: megatron-core's builder, `add_document(ids, [len(ids)])` for a text with ids (plus
    EOD when asked) and `add_document([], [])` for one without any."""
    tok = build_tokenizer("EmbeddedTokenizer")
    builder = import_indexed_dataset().IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for text in texts:
        ids = tok.encode(text)
        if ids and append_eod:
            ids.append(tok.eod)
        builder.add_document(np.array(ids, dtype=np.uint16), [len(ids)] if ids else [])
    builder.finalize(prefix + ".idx")
    return _read(prefix)


MIXED = [("first text", "t1"), ("", "t2"), ("third", ""), ("", ""), ("last one", "t5")]


@pytest.mark.parametrize("append_eod, workers", [(True, "1"), (False, "1"), (True, "2")])
def test_empty_texts_are_written_as_megatron_writes_them(tmp_path, capsys, append_eod, workers):
    inp = tmp_path / "in.jsonl"
    write_jsonl([{"text": a, "title": b} for a, b in MIXED], str(inp))
    rc, out = _run(tmp_path, "--input", str(inp), "--output-prefix", str(tmp_path / "ours"),
                   "--json-keys", "text", "title", "--workers", workers, "--chunk-lines", "2",
                   *(["--append-eod"] if append_eod else []), capsys=capsys)
    assert rc == 0
    for column, key in enumerate(("text", "title")):
        reference = _megatron_reference(str(tmp_path / f"ref_{key}"),
                                        [pair[column] for pair in MIXED], append_eod)
        assert _read(str(tmp_path / f"ours_{key}_document")) == reference, key
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["documents"] == 5 and summary["empty_documents"] == {"text": 2, "title": 2}


def test_an_empty_document_is_an_index_entry_without_a_sequence(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    write_jsonl([{"text": t} for t in ("ab", "", "cd")], str(inp))
    assert _run(tmp_path, "--input", str(inp), "--output-prefix", str(tmp_path / "o"),
                "--append-eod", capsys=capsys)[0] == 0
    tok = build_tokenizer("EmbeddedTokenizer")
    ds = read_indexed_dataset(str(tmp_path / "o_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == \
        [tok.encode("ab") + [tok.eod], tok.encode("cd") + [tok.eod]]
    assert ds.document_indices.tolist() == [0, 1, 1, 2]  # document 1 holds no sequence


def test_training_data_built_over_empty_documents_holds_only_real_tokens(tmp_path, capsys):
    from megatron_rlp.data.datasets import build_pretraining_dataset

    inp = tmp_path / "in.jsonl"
    write_jsonl([{"text": t} for t in ["", "1 + 2 = 3", "", "", "4 + 5 = 9", ""]], str(inp))
    assert _run(tmp_path, "--input", str(inp), "--output-prefix", str(tmp_path / "o"),
                "--append-eod", capsys=capsys)[0] == 0
    tok = build_tokenizer("EmbeddedTokenizer")
    a, b = (tok.encode(t) + [tok.eod] for t in ("1 + 2 = 3", "4 + 5 = 9"))
    # A 4-token window spans at most two (shuffled, repeated) documents: AA, AB, BB or BA.
    stream = a + a + b + b + a
    ds = build_pretraining_dataset([str(tmp_path / "o_text_document")], 4, 6, 0, tok,
                                   cache_dir=str(tmp_path / "cache"))
    for i in range(6):
        tokens = ds[i]["tokens"].tolist()
        assert any(tokens == stream[s:s + 4] for s in range(len(stream))), tokens


# ---- Parquet ----------------------------------------------------------------------------------

def _docs_with_titles(n, seed):
    docs = generate_corpus(n, seed=seed)
    for i, d in enumerate(docs):
        d["title"] = "" if i % 7 == 3 else f"title {i}"
    return docs


def _write_parquet(path, docs, row_group_size=64, **kwargs):
    table = pa.table({"id": list(range(len(docs))), "text": [d["text"] for d in docs],
                      "title": [d["title"] for d in docs]})
    pq.write_table(table, str(path), row_group_size=row_group_size, **kwargs)
    return str(path)


def test_parquet_file_gives_the_same_output_as_jsonl(tmp_path, capsys):
    docs = _docs_with_titles(200, seed=5)
    jsonl = write_jsonl(docs, str(tmp_path / "docs.jsonl"))
    parquet = _write_parquet(tmp_path / "docs.parquet", docs)  # 4 row groups
    for name, inp in (("j", jsonl), ("p", parquet)):
        rc, out = _run(tmp_path, "--input", inp, "--output-prefix", str(tmp_path / name),
                       "--json-keys", "text", "title", "--append-eod", "--workers", "2",
                       "--chunk-lines", "50", capsys=capsys)
        assert rc == 0, out.err
    for key in ("text", "title"):
        assert _read(str(tmp_path / f"j_{key}_document")) == \
            _read(str(tmp_path / f"p_{key}_document")), key
    assert json.loads(out.out.strip().splitlines()[-1])["documents"] == 200


def test_parquet_folder_is_read_in_sorted_path_order(tmp_path, capsys):
    docs = _docs_with_titles(90, seed=6)
    folder = tmp_path / "dataset"
    (folder / "data" / "b").mkdir(parents=True)
    (folder / "README.md").write_text("not data")
    # Sorted paths: data/a-0.parquet, data/b/0.parquet, data/c.parquet.
    _write_parquet(folder / "data" / "c.parquet", docs[60:])
    _write_parquet(folder / "data" / "a-0.parquet", docs[:25], row_group_size=10)
    _write_parquet(folder / "data" / "b" / "0.parquet", docs[25:60])
    jsonl = write_jsonl(docs, str(tmp_path / "all.jsonl"))
    for name, inp in (("j", jsonl), ("f", str(folder))):
        assert _run(tmp_path, "--input", inp, "--output-prefix", str(tmp_path / name),
                    "--append-eod", capsys=capsys)[0] == 0
    assert _read(str(tmp_path / "j_text_document")) == _read(str(tmp_path / "f_text_document"))


def _assert_failed_cleanly(tmp_path, rc, out, *needles, keep=()):
    assert rc == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in needles), out.err
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


def test_parquet_without_the_named_column_fails_before_any_output(tmp_path, capsys):
    path = _write_parquet(tmp_path / "d.parquet", _docs_with_titles(10, seed=1))
    rc, out = _run(tmp_path, "--input", path, "--output-prefix", str(tmp_path / "new" / "o"),
                   "--json-keys", "text", "body", capsys=capsys)
    _assert_failed_cleanly(tmp_path, rc, out, path, "no column 'body'", "id, text, title",
                           keep=["d.parquet"])


def test_parquet_column_that_is_not_text_is_refused(tmp_path, capsys):
    path = _write_parquet(tmp_path / "d.parquet", _docs_with_titles(10, seed=1))
    rc, out = _run(tmp_path, "--input", path, "--output-prefix", str(tmp_path / "o"),
                   "--json-keys", "id", capsys=capsys)
    _assert_failed_cleanly(tmp_path, rc, out, path, "column 'id' holds int64, not strings",
                           keep=["d.parquet"])


@pytest.mark.parametrize("damage", ["truncated", "not parquet"])
def test_corrupt_parquet_file_fails_naming_it_and_writes_nothing(tmp_path, capsys, damage):
    good = _write_parquet(tmp_path / "a.parquet", _docs_with_titles(20, seed=2))
    data = open(good, "rb").read()
    bad = tmp_path / "b.parquet"
    bad.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"PAR1 nonsense" * 9)
    rc, out = _run(tmp_path, "--input", str(tmp_path), "--output-prefix",
                   str(tmp_path / "new" / "o"), capsys=capsys)
    _assert_failed_cleanly(tmp_path, rc, out, f"{bad}: not a readable Parquet file",
                           keep=["a.parquet", "b.parquet"])


@pytest.mark.parametrize("workers", ["1", "2"])
def test_damaged_parquet_page_found_while_streaming_leaves_no_output(tmp_path, capsys, workers):
    docs = _docs_with_titles(400, seed=3)
    path = _write_parquet(tmp_path / "d.parquet", docs, row_group_size=100,
                          compression="none", write_page_checksum=True)
    data = bytearray(open(path, "rb").read())
    # Row groups are written in order: 3/4 of the way in lies the data of the last ones.
    middle = 3 * len(data) // 4
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    open(path, "wb").write(bytes(data))
    rc, out = _run(tmp_path, "--input", path, "--output-prefix", str(tmp_path / "new" / "o"),
                   "--workers", workers, "--chunk-lines", "50", capsys=capsys)
    _assert_failed_cleanly(tmp_path, rc, out, path, "damaged Parquet data",
                           "no output was written", keep=["d.parquet"])


def test_null_parquet_text_is_a_malformed_row(tmp_path, capsys):
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"text": ["one", None, "three"]}), path)
    rc, out = _run(tmp_path, "--input", path, "--output-prefix", str(tmp_path / "o"),
                   capsys=capsys)
    assert rc == 2 and f"{path}: row index 1: column 'text' is null" in out.err
    rc, out = _run(tmp_path, "--input", path, "--output-prefix", str(tmp_path / "o"),
                   "--on-error", "skip", capsys=capsys)
    assert rc == 0 and json.loads(out.out.strip().splitlines()[-1])["skipped"] == 1
    tok = build_tokenizer("EmbeddedTokenizer")
    ds = read_indexed_dataset(str(tmp_path / "o_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode("one"), tok.encode("three")]


def test_folder_without_parquet_files_is_refused(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "docs.jsonl").write_text('{"text": "a"}\n')
    rc, out = _run(tmp_path, "--input", str(tmp_path / "in"), "--output-prefix",
                   str(tmp_path / "o"), capsys=capsys)
    _assert_failed_cleanly(tmp_path, rc, out, "is a folder without .parquet files", keep=["in"])


def test_parquet_without_pyarrow_names_the_extra(tmp_path, capsys, monkeypatch):
    path = _write_parquet(tmp_path / "d.parquet", _docs_with_titles(5, seed=1))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    rc, out = _run(tmp_path, "--input", path, "--output-prefix", str(tmp_path / "o"),
                   capsys=capsys)
    _assert_failed_cleanly(tmp_path, rc, out, "needs pyarrow", "megatron-rlp[parquet]",
                           keep=["d.parquet"])
