"""tools/preprocess_data.py: outputs, worker invariance, gzip, malformed lines, flags."""
import gzip
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from megatron_rlp.data.corpus import generate_corpus, write_jsonl
from megatron_rlp.data.indexed import read_indexed_dataset
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
    assert rc == 1
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
    assert rc == 1 and message in out.err
    assert os.listdir(tmp_path) == []


def test_missing_input_is_reported(tmp_path, capsys):
    rc, out = _run(tmp_path, "--input", str(tmp_path / "none.jsonl"), "--output-prefix",
                   str(tmp_path / "x"), capsys=capsys)
    assert rc == 1 and "none.jsonl': no such file" in out.err


def test_command_line_help_lists_megatron_flags():
    out = subprocess.run([sys.executable, TOOL, "--help"], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    for flag in ("--input", "--output-prefix", "--json-keys", "--tokenizer-type",
                 "--tokenizer-model", "--workers", "--append-eod", "--on-error"):
        assert flag in out
