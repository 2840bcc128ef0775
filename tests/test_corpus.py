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


# ---- thinking-style documents -------------------------------------------------------------------
_STEP = re.compile(r"Step \d+: (-?\d+) ([-+*]) (\d+) =<think>(.*?)</think> (-?\d+)")
_COLUMN = re.compile(r"(\d+) ([-+*]) (\d+)(?: \+ (\d+))? = (\d+)")


def test_think_share_zero_is_the_think_free_corpus_and_thoughts_only_add_spans():
    from megatron_rlp.data.corpus import strip_thoughts

    plain = generate_corpus(400, seed=9)
    thinking = generate_corpus(400, seed=9, think_share=1.0)
    assert plain == generate_corpus(400, seed=9, think_share=0.0)
    assert not any("<think>" in d["text"] or d.get("thinking") for d in plain)
    flagged = [d for d in thinking if d.get("thinking")]
    assert {d["source"] for d in flagged} == {"arithmetic", "algebra"}
    for p, t in zip(plain, thinking):
        assert (p["source"], p["quality"]) == (t["source"], t["quality"])
        if p["source"] != "algebra":  # arithmetic: the same text once the thoughts are cut
            assert strip_thoughts(t["text"]) == p["text"]
    # Every worked arithmetic document thinks at share 1; terse drills never do.
    worked = [d for d in thinking if d["source"] == "arithmetic" and d["quality"] == "high"]
    assert worked and all(d.get("thinking") for d in worked)
    half = generate_corpus(2000, seed=9, think_share=0.5)
    share = sum(bool(d.get("thinking")) for d in half) / sum(
        d["source"] in ("arithmetic", "algebra") and d["quality"] == "high" for d in half)
    assert 0.4 < share < 0.6


def test_column_thoughts_are_correct_and_end_with_the_written_result():
    checked = 0
    for d in generate_corpus(600, seed=4, think_share=1.0):
        for a, op, b, thought, result in _STEP.findall(d["text"]):
            a, b, result = int(a), int(b), int(result)
            assert {"+": a + b, "-": a - b, "*": a * b}[op] == result
            assert thought.endswith(f"so {result}"), thought
            columns = _COLUMN.findall(thought)
            assert columns, thought
            for x, cop, y, carry, z in columns:    # every column step is itself right
                x, y, z, carry = int(x), int(y), int(z), int(carry or 0)
                assert {"+": x + y + carry, "-": x - y, "*": x * y + carry}[cop] == z, thought
                assert z < 100 and (cop != "-" or 0 <= z <= 9)
            # The ones digit of the result is the ones digit of the first column's value.
            assert int(columns[0][4]) % 10 == abs(result) % 10, thought
            checked += 1
    assert checked > 300


def test_algebra_thoughts_isolate_the_variable_before_it_is_written():
    pattern = re.compile(r"(\w) =<think>(.*?) so (-?\d+)</think> (-?\d+)\.\n"
                         r"Check: (.*)\. So \1 = (-?\d+)\.")
    found = 0
    for d in generate_corpus(500, seed=6, think_share=1.0):
        if d["source"] != "algebra":
            continue
        for var, steps, said, written, check, final in pattern.findall(d["text"]):
            assert said == written == final
            assert steps.endswith(f"{var} = {written}.") or steps.endswith(f"= {written}.")
            found += 1
    assert found > 100


def test_think_share_outside_zero_one_is_rejected():
    with pytest.raises(ValueError, match=r"think_share must be in \[0, 1\]"):
        generate_corpus(3, seed=0, think_share=1.5)


def test_strip_thoughts_removes_spans_and_rejects_an_open_one():
    from megatron_rlp.data.corpus import strip_thoughts

    assert strip_thoughts("1 + 2 =<think>so 3</think> 3\nx =<think>a</think> 4.") == \
        "1 + 2 = 3\nx = 4."
    with pytest.raises(ValueError, match="never closed"):
        strip_thoughts("1 =<think>so")
