"""Think-then-answer evaluation of a checkpoint (used by rlp_vs_cpt.py).

On held-out, think-free worked arithmetic ("Step k: a op b = N"), each result N is asked for twice:

    no-think   prefix "... a op b =" -> greedy decode -> the number it starts with
    think      prefix + <think> -> greedy thought (<= max_thought tokens, stops at </think>;
               a thought that runs out is closed by us, as an RLP rollout does) + </think>
               -> greedy decode -> the number it starts with

and scored by exact match. The same thoughts also give the information gain of thinking at those
positions, log p(x_t | prefix, thought) - log p(x_t | prefix) for x_t = the result's first token,
and, for comparison, at ordinary positions (any other token of the same documents), i.e. which
positions a thought helps.
"""
from __future__ import annotations

import random
import re
from typing import List, Sequence

RESULT = re.compile(r"(Step \d+: -?\d+ [-+*] \d+ =) (-?\d+)")
NUMBER = re.compile(r"^\s*(-?\d+)")


def result_questions(texts: Sequence[str]) -> List[tuple]:
    """(prefix text ending in '=', result string) for every worked step of the texts."""
    return [(text[:m.end(1)], m.group(2)) for text in texts for m in RESULT.finditer(text)]


def ordinary_positions(tok, texts: Sequence[str], count: int, seed: int, min_prefix: int = 16
                       ) -> List[tuple]:
    """`count` (prefix ids, target id) pairs at random token positions that are not a result."""
    rng = random.Random(seed)
    pairs = []
    for text in texts:
        results = {m.start(2) for m in RESULT.finditer(text)}
        ids = tok.encode(text)
        # Char offset of each token start, to skip the result tokens' positions.
        starts, pos = [], 0
        for i in ids:
            starts.append(pos)
            pos += len(tok.decode([i]))
        for t in range(min_prefix, len(ids)):
            if not any(abs(starts[t] - r) <= 1 for r in results):
                pairs.append((ids[:t], ids[t]))
    rng.shuffle(pairs)
    return pairs[:count]


def _logp_last(model, rows: List[List[int]], targets: List[int], batch: int = 32) -> List[float]:
    """log p(target | row) for each row (teacher forcing, one forward per batch)."""
    import torch

    out = []
    for s in range(0, len(rows), batch):
        chunk, tg = rows[s:s + batch], targets[s:s + batch]
        width = max(len(r) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, :len(r)] = torch.tensor(r)
        with torch.no_grad():
            logits = model(ids).float().cpu()
        for i, r in enumerate(chunk):
            out.append(float(torch.log_softmax(logits[i, len(r) - 1], -1)[tg[i]]))
    return out


def _greedy(decoder, tok, prompts, max_new: int, stop: Sequence[int]):
    from megatron_rlp.inference.generate import generate

    out = []
    for s in range(0, len(prompts), 64):
        g = generate(decoder, prompts[s:s + 64], max_new_tokens=max_new, temperature=0.0,
                     stop_ids=list(stop), pad_id=tok.pad)
        for r in range(g.tokens.shape[0]):
            n = int(g.lengths[r])
            out.append((g.tokens[r, :n].tolist(), bool(g.stopped[r])))
    return out


def _think(decoder, tok, prefixes: List[List[int]], max_thought: int):
    """Greedy thought per prefix -> (rows prefix+<think>+thought+</think>, stopped, lengths)."""
    thoughts = _greedy(decoder, tok, [p + [tok.think_start] for p in prefixes], max_thought,
                       [tok.think_end])
    rows, stopped, lengths = [], [], []
    for p, (ids, stop) in zip(prefixes, thoughts):
        body = ids[:-1] if stop else ids           # drop the sampled </think>, add one below
        rows.append(p + [tok.think_start] + body + [tok.think_end])
        stopped.append(stop)
        lengths.append(len(ids))
    return rows, stopped, lengths


def _answers(decoder, tok, prompts) -> List[str]:
    outs = _greedy(decoder, tok, prompts, 7, [tok.eod])
    found = [NUMBER.match(tok.decode(ids)) for ids, _ in outs]
    return [m.group(1) if m else "" for m in found]


def evaluate(checkpoint: str, texts: Sequence[str], max_thought: int, ordinary: int = 0,
             seed: int = 0) -> dict:
    """Think-then-answer and no-think accuracy on the results of `texts`, thought stop rate and
    length, and the mean information gain of a greedy thought at result / ordinary positions."""
    import megatron_rlp
    from megatron_rlp.data.tokenizer import build_tokenizer
    from megatron_rlp.inference.decode import CachedDecoder

    model = megatron_rlp.load_model(checkpoint, device="cpu")
    cfg = model.run_config
    tok = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    decoder = CachedDecoder(model.model, tok.vocab_size)
    questions = result_questions(texts)
    if not questions:
        raise ValueError("no worked arithmetic step in the evaluation texts")
    prefixes = [tok.encode(p) for p, _ in questions]
    truth = [a for _, a in questions]
    first = [tok.encode(" " + a)[0] for a in truth]          # the result's first token
    plain = _answers(decoder, tok, prefixes)
    rows, stopped, lengths = _think(decoder, tok, prefixes, max_thought)
    thought = _answers(decoder, tok, rows)
    gain_result = [a - b for a, b in zip(_logp_last(model, rows, first),
                                         _logp_last(model, prefixes, first))]
    n = len(questions)
    out = {
        "questions": n,
        "think_acc": sum(a == b for a, b in zip(thought, truth)) / n,
        "no_think_acc": sum(a == b for a, b in zip(plain, truth)) / n,
        "stopped_frac": sum(stopped) / n,
        "thought_len_mean": sum(lengths) / n,
        "gain_result": sum(gain_result) / n,
        "gain_result_positive_frac": sum(g > 0 for g in gain_result) / n,
        "correct_think": [a == b for a, b in zip(thought, truth)],
    }
    if ordinary:
        pairs = ordinary_positions(tok, texts, ordinary, seed)
        o_pref, o_tgt = [p for p, _ in pairs], [t for _, t in pairs]
        o_rows, o_stop, _ = _think(decoder, tok, o_pref, max_thought)
        gains = [a - b for a, b in zip(_logp_last(model, o_rows, o_tgt),
                                       _logp_last(model, o_pref, o_tgt))]
        out.update(gain_ordinary=sum(gains) / len(gains),
                   gain_ordinary_positive_frac=sum(g > 0 for g in gains) / len(gains),
                   stopped_frac_ordinary=sum(o_stop) / len(o_stop))
    return out
