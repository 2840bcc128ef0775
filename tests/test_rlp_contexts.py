"""RLP contexts respect document boundaries in packed windows: the context of position t starts at
t's document start (truncated to --rlp-max-context), never reaches into another document, and
positions inside or right after a written <think> ... </think> span are not chosen."""
import pytest
import torch

from megatron_rlp.rlp.rollout import (choose_positions, document_contexts,
                                      document_continuation, thought_spans)

EOD, THINK, END = 0, 2, 3


def _window(doc_lengths, first=10):
    """Documents of the given lengths (the last token of each is <eod>), distinct token values."""
    out, value = [], first
    for n in doc_lengths:
        out += list(range(value, value + n - 1)) + [EOD]
        value += 100
    return torch.tensor(out)


def _reference_context(row: list, t: int, max_context) -> list:
    """Obviously right: walk back from t-1 until an <eod> (the previous document's last token)."""
    start = t
    while start > 0 and row[start - 1] != EOD:
        start -= 1
    ctx = row[start:t]
    return ctx[-max_context:] if max_context else ctx


@pytest.mark.parametrize("max_context", [None, 5])
def test_contexts_start_at_their_document_and_never_cross_an_eod(max_context):
    text = torch.stack([_window([7, 12, 4, 9]), _window([20, 12])])   # [2, 32]
    gen = torch.Generator().manual_seed(0)
    seen_first_docs = set()
    for _ in range(200):
        t = choose_positions(text, 3, EOD, gen)
        contexts = document_contexts(text, t, EOD, max_context)
        for b, ctx in enumerate(contexts):
            row, tb = text[b].tolist(), int(t[b])
            assert row[tb] != EOD and len(ctx) >= (min(3, max_context or 3))
            assert ctx == _reference_context(row, tb, max_context)
            assert EOD not in ctx                      # never the end of a previous document
            assert len({v // 100 for v in ctx + [row[tb]]}) == 1  # one document's tokens only
            seen_first_docs.add((b, row[tb] // 100))
    # Every document long enough (>= 3 tokens before a non-<eod> target) gets picked.
    assert seen_first_docs == {(0, 0), (0, 1), (0, 3), (1, 0), (1, 1)}


def test_a_window_cut_mid_document_starts_its_context_at_the_window_start():
    text = _window([30, 6])[10:][None]                 # the first document lost its head
    t = torch.tensor([12])
    assert document_contexts(text, t, EOD)[0] == text[0, :12].tolist()
    t = torch.tensor([text.shape[1] - 2])              # inside the second document
    ctx = document_contexts(text, t, EOD)[0]
    assert ctx == text[0, 20:-2].tolist() and EOD not in ctx


def test_positions_count_from_their_own_document_for_min_prefix():
    text = _window([5, 5, 5, 17])[None]                # only the last document reaches offset 8
    gen = torch.Generator().manual_seed(1)
    picks = {int(choose_positions(text, 8, EOD, gen)) for _ in range(100)}
    assert picks and min(picks) >= 15 + 8 and text[0, max(picks)] != EOD


def test_a_window_of_short_documents_falls_back_to_the_deepest_position():
    text = _window([3, 4, 3])[None]
    t = int(choose_positions(text, 8, EOD, torch.Generator().manual_seed(0)))
    assert t == 5                                      # offset 2 in the 4-token document
    assert document_contexts(text, torch.tensor([t]), EOD)[0] == text[0, 3:5].tolist()
    with pytest.raises(ValueError, match="no document with a token after its first"):
        choose_positions(torch.tensor([[EOD, 7, EOD, 8, EOD]]), 1, EOD,
                         torch.Generator().manual_seed(0))


def test_written_thoughts_are_marked_and_never_chosen():
    #                  0  1  2  3      4  5  6    7  8  9 10 11 12 13
    text = torch.tensor([[5, 6, 7, THINK, 8, 9, END, 4, 1, 6, 9, 9, 9, EOD]])
    spans = thought_spans(text, THINK, END)
    assert spans[0].tolist() == [False] * 3 + [True] * 4 + [False] * 7
    # A window that opens inside a thought: everything up to the first </think> is thought.
    cut = torch.tensor([[8, 9, END, 4, THINK, 1, END, 5]])
    assert thought_spans(cut, THINK, END)[0].tolist() == [True] * 3 + [False] + [True] * 3 + [False]
    gen = torch.Generator().manual_seed(2)
    picks = {int(choose_positions(text, 1, EOD, gen, thought_markers=(THINK, END)))
             for _ in range(300)}
    assert picks == {1, 2, 8, 9, 10, 11, 12}     # not 3-6 (thought), 7 (after it), 13 (<eod>)


def test_rpt_truth_stops_at_the_document_end():
    assert document_continuation([4, 5, EOD, 7, 8], EOD, 8) == [4, 5, EOD]
    assert document_continuation([4, 5, 6, 7], EOD, 3) == [4, 5, 6]
