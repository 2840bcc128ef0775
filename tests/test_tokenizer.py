"""Tokenizers: round trips, special ids, the shipped embedded file, foreign files, bad input."""
import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from megatron_rlp.data import tokenizer as tk
from megatron_rlp.data.tokenizer import build_tokenizer

TEXTS = [
    "Step 1: 17 + 25 = 42\nAnswer: 42",
    "Solve for x: 3x + 7 = 22.\n\tCheck: 3 * 5 + 7 = 22.",
    "<think> 42 - 8 = 34 </think> so the total is 34<eod>",
    "unicode: héllo, 数学, emoji 😀, trailing spaces   ",
    "",
]


@pytest.mark.parametrize("kind", ["EmbeddedTokenizer", "ByteTokenizer"])
@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode_including_special_tokens(kind, text):
    tok = build_tokenizer(kind)
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("kind", ["EmbeddedTokenizer", "ByteTokenizer"])
def test_special_tokens_are_distinct_single_ids(kind):
    tok = build_tokenizer(kind)
    ids = {"<eod>": tok.eod, "<pad>": tok.pad, "<think>": tok.think_start,
           "</think>": tok.think_end}
    assert len(set(ids.values())) == 4
    for text, i in ids.items():
        assert tok.token_to_id(text) == i
        assert tok.encode(text) == [i]
        assert 0 <= i < tok.vocab_size


def test_embedded_tokenizer_has_a_small_vocab_with_specials_first():
    tok = build_tokenizer()  # the default type
    assert tok.tokenizer_type == "EmbeddedTokenizer"
    assert 512 <= tok.vocab_size <= 1024
    assert (tok.eod, tok.pad, tok.think_start, tok.think_end) == (0, 1, 2, 3)


def test_embedded_tokenizer_splits_numbers_into_single_digits():
    tok = build_tokenizer("EmbeddedTokenizer")
    pieces = [tok.decode([i]) for i in tok.encode("x = 1234 + 56")]
    digits = [p.strip() for p in pieces if p.strip().isdigit()]
    assert digits == ["1", "2", "3", "4", "5", "6"]


def test_shipped_embedded_tokenizer_equals_a_fresh_training_run():
    # Compare content, not bytes, so a different `tokenizers` release serialising extra fields
    # does not fail this test; a change to the corpus or trainer settings does.
    shipped = json.loads(open(tk.EMBEDDED_TOKENIZER_PATH, encoding="utf-8").read())
    fresh = json.loads(tk.train_embedded_tokenizer().to_str())
    for key in ("added_tokens", "pre_tokenizer", "decoder"):
        assert fresh[key] == shipped[key], key
    assert fresh["model"]["vocab"] == shipped["model"]["vocab"]
    assert fresh["model"]["merges"] == shipped["model"]["merges"]


def test_byte_tokenizer_ids_are_byte_values():
    tok = build_tokenizer("ByteTokenizer")
    text = "aé\n😀"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.vocab_size == 260
    assert (tok.eod, tok.pad, tok.think_start, tok.think_end) == (256, 257, 258, 259)


@pytest.mark.parametrize("kind", ["HuggingFaceTokenizer", "TokenizerFile"])
def test_exported_json_loads_back_as_a_tokenizer_file(tmp_path, kind):
    ours = build_tokenizer("EmbeddedTokenizer")
    path = tmp_path / "tokenizer.json"
    path.write_text(ours.hf_tokenizer_json(), encoding="utf-8")
    for model in (str(path), str(tmp_path)):  # the file, or a folder holding tokenizer.json
        theirs = build_tokenizer(kind, model)
        assert theirs.vocab_size == ours.vocab_size
        assert (theirs.eod, theirs.pad, theirs.think_start, theirs.think_end) == \
            (ours.eod, ours.pad, ours.think_start, ours.think_end)
        for text in TEXTS:
            assert theirs.encode(text) == ours.encode(text)


def test_exported_json_loads_in_transformers_with_the_same_ids(tmp_path):
    from transformers import PreTrainedTokenizerFast

    ours = build_tokenizer("EmbeddedTokenizer")
    path = tmp_path / "tokenizer.json"
    path.write_text(ours.hf_tokenizer_json(), encoding="utf-8")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
        assert hf.decode(ours.encode(text)) == text


def test_foreign_tokenizer_without_eod_fails_on_use_with_a_fix(tmp_path):
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    wrapped = build_tokenizer("HuggingFaceTokenizer", str(path))
    assert wrapped.encode("a b") == [0, 1]
    assert wrapped.think_start is None and wrapped.pad is None
    with pytest.raises(ValueError, match="no end-of-document token"):
        wrapped.eod


def test_foreign_tokenizer_with_endoftext_uses_it_as_eod_and_pad(tmp_path):
    tok = Tokenizer(models.WordLevel({"a": 0, "<|endoftext|>": 5}, unk_token="a"))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    wrapped = build_tokenizer("TokenizerFile", str(path))
    assert wrapped.eod == 5 and wrapped.pad == 5 and wrapped.vocab_size == 6


@pytest.mark.parametrize("kind, model, error, message", [
    ("GPT2BPETokenizer", None, ValueError, "valid types: EmbeddedTokenizer, HuggingFaceTokenizer"),
    ("HuggingFaceTokenizer", None, ValueError, "needs --tokenizer-model"),
    ("HuggingFaceTokenizer", "/nonexistent/tokenizer.json", FileNotFoundError, "no such file"),
    ("HuggingFaceTokenizer", "gpt2", FileNotFoundError, "nothing is downloaded"),
    ("EmbeddedTokenizer", "x.json", ValueError, "takes no --tokenizer-model"),
    ("ByteTokenizer", "x.json", ValueError, "takes no --tokenizer-model"),
])
def test_bad_tokenizer_arguments_are_rejected(kind, model, error, message):
    with pytest.raises(error, match=message):
        build_tokenizer(kind, model)


def test_invalid_tokenizer_json_is_rejected(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not a valid HF tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", str(path))
