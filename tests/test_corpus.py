"""The generated corpus: deterministic, all sources/qualities present, worked answers correct."""
import gzip
import json
import os
import re

import pytest

from megatron_rlp.data.corpus import QUALITIES, SOURCES, generate_corpus, write_jsonl


def test_same_seed_gives_the_same_documents_and_other_seeds_differ():
    a, b = generate_corpus(300, seed=7), generate_corpus(300, seed=7)
    assert a == b
    assert generate_corpus(300, seed=8) != a


def test_document_i_does_not_depend_on_how_many_are_generated():
    assert generate_corpus(500, seed=3)[:120] == generate_corpus(120, seed=3)


def test_every_source_and_quality_appears_with_required_fields():
    docs = generate_corpus(2000, seed=0)
    assert {d["source"] for d in docs} == set(SOURCES)
    assert {d["quality"] for d in docs} == set(QUALITIES)
    for d in docs:
        assert isinstance(d["text"], str) and d["text"]
        assert d["source"] in SOURCES and d["quality"] in QUALITIES
    # the low tier is web filler only; mathematical sources are never low quality
    assert {d["source"] for d in docs if d["quality"] == "low"} == {"web"}


_EQ = re.compile(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)")


def test_worked_arithmetic_and_records_are_correct():
    # The corpus is only useful for reasoning if every stated result is right.
    checked = 0
    for d in generate_corpus(1500, seed=11):
        if d["source"] == "arithmetic":
            for a, op, b, c in _EQ.findall(d["text"]):
                a, b, c = int(a), int(b), int(c)
                assert {"+": a + b, "-": a - b, "*": a * b}[op] == c, d["text"]
                checked += 1
        elif d["source"] == "records" and "invoice" in d["text"]:
            costs = [int(x) for x in re.findall(r"cost: (\d+)", d["text"])]
            for qty, price, cost in re.findall(r"qty: (\d+), price: (\d+), cost: (\d+)", d["text"]):
                assert int(qty) * int(price) == int(cost)
            assert int(re.search(r"total: (\d+)", d["text"]).group(1)) == sum(costs)
        elif d["source"] == "lists":
            for block in d["text"].split("\n\n")[:-1]:
                nums = [int(x) for x in re.search(r"Numbers: (.*)", block).group(1).split(", ")]
                sorted_text = re.search(r"Sorted: (.*)", block).group(1)
                assert sorted_text == ", ".join(map(str, sorted(nums)))
                assert int(re.search(r"Sum: (\d+)", block).group(1)) == sum(nums)
    assert checked > 1000


def test_algebra_solutions_satisfy_their_equations():
    for d in generate_corpus(800, seed=5):
        if d["source"] != "algebra":
            continue
        for block in d["text"].split("\n\n"):
            head = block.splitlines()[0]
            x = int(re.search(r"So \w = (-?\d+)\.", block).group(1))
            m = re.match(r"Solve for \w: (\d+)\w \+ (\d+) = (-?\d+)\.", head)
            if m:
                a, b, c = map(int, m.groups())
                assert a * x + b == c, block
            else:
                a, b, c = map(int, re.match(r"Solve for \w: (\d+)\(\w - (\d+)\) = (-?\d+)\.",
                                            head).groups())
                assert a * (x - b) == c, block


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz"])
def test_write_jsonl_round_trips_and_leaves_no_temp_file(tmp_path, name):
    docs = generate_corpus(50, seed=1)
    path = write_jsonl(docs, str(tmp_path / "sub" / name))
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == docs
    assert os.listdir(tmp_path / "sub") == [name]


def test_write_jsonl_gzip_output_is_byte_deterministic(tmp_path):
    docs = generate_corpus(20, seed=2)
    a = open(write_jsonl(docs, str(tmp_path / "a.jsonl.gz")), "rb").read()
    b = open(write_jsonl(docs, str(tmp_path / "b.jsonl.gz")), "rb").read()
    assert a == b


def test_write_jsonl_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    write_jsonl([{"text": "old"}], str(path))

    def broken():
        yield {"text": "new"}
        raise RuntimeError("generator died")

    with pytest.raises(RuntimeError):
        write_jsonl(broken(), str(path))
    assert path.read_text() == '{"text": "old"}\n'
    assert os.listdir(tmp_path) == ["docs.jsonl"]


def test_negative_document_count_is_rejected():
    with pytest.raises(ValueError, match="num_docs must be a non-negative int"):
        generate_corpus(-1, seed=0)
