"""Rollouts: pick a position per document, build the prompt, sample G thoughts with the cached
decoder, and lay out the rows the training forward reads.

Per sample (text = tokens of the packed window plus its last label, S+1 tokens; a window holds
several documents, each ended by <eod>, see megatron_rlp/models/packing.py):
    t ~ Uniform{positions at least --rlp-min-prefix tokens into their document, whose target is not
                <eod> and that lie outside any <think> ... </think> span of the text}  (RPT filter
                optional)
    context  x_<t from t's document start (the window start for a document cut by the window),
             the last --rlp-max-context of them; never a token of another document
    target   x_t
    prompt   encode(template before {context}) + context + encode(template after) + <think>
Per thought i of G (row r = b*G + i):
    row      prompt | c_1 .. c_k | (</think> appended if the thought hit the length limit) | x_t
Label positions (labels[j] = row[j+1]) of the sampled thought tokens c_1..c_k (a sampled </think>
included) form `thought_mask`; `target_pos` is the label position of x_t.

Randomness (positions and sampling) comes from a generator seeded by (--seed, the global index of
the micro-batch's first sample): a resumed run, or a run at another DP size with the same
micro-batch size, draws exactly the same thoughts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from megatron_rlp.models.packing import document_ids, positions_in_document
from megatron_rlp.inference.generate import generate

from .reward import token_logprobs, top_k_entropy

_SEED_MIX = 0x9E3779B97F4A7C15


def rollout_generator(seed: int, first_sample: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * _SEED_MIX + first_sample) % (1 << 63))


def split_template(template: str, tokenizer):
    before, after = template.split("{context}", 1)
    return (tokenizer.encode(before) if before else []), (tokenizer.encode(after) if after else [])


@dataclass
class Rollout:
    tokens: torch.Tensor          # [N, L] rows, right-padded
    labels: torch.Tensor          # [N, L] tokens shifted left by one
    thought_mask: torch.Tensor    # [N, L] 1.0 at label positions of sampled thought tokens
    target_pos: torch.Tensor      # [N] label position of x_t
    targets: torch.Tensor         # [B] x_t per context
    teacher_logp: torch.Tensor    # [B] log p_phi(x_t | x_<t)
    sampler_logp: torch.Tensor    # [N, L] cached decoder's log p_T at thought label positions
    thought_len: torch.Tensor     # [N] sampled thought tokens
    stopped: torch.Tensor         # [N] ended with a sampled </think>
    num_thoughts: int
    truth: List[List[int]] = field(default_factory=list)  # [B] true continuation x_t.. (RPT)
    context_tokens: int = 0
    generated_tokens: int = 0
    rollout_s: float = 0.0
    reward_s: float = 0.0
    ref_logp: Optional[torch.Tensor] = None  # [N, L] teacher log-probs on the rows (KL term)


def thought_spans(text: torch.Tensor, think_start: int, think_end: int) -> torch.Tensor:
    """text [B, n] -> bool [B, n]: True on every token of a written `<think> ... </think>` span,
    both markers included. A window that starts inside a thought (its first `</think>` comes before
    any `<think>`) counts everything up to that `</think>` as thought."""
    is_start, is_end = text == think_start, text == think_end
    index = torch.arange(text.shape[-1], device=text.device).expand_as(text)
    big = text.shape[-1]
    first_end = torch.where(is_end, index, big).min(dim=-1, keepdim=True).values
    first_start = torch.where(is_start, index, big).min(dim=-1, keepdim=True).values
    opens_cut = first_end < first_start                # the window starts inside a thought
    opened = torch.cumsum(is_start.long(), dim=-1)
    # </think> markers before this token, not counting the cut thought's (it has no <think> here)
    closed_before = (torch.cumsum(is_end.long(), dim=-1) - is_end.long()
                     - (opens_cut & (index > first_end)).long())
    return (opened > closed_before) | (opens_cut & (index <= first_end))


def choose_positions(text: torch.Tensor, min_prefix: int, eod: int, generator: torch.Generator,
                     allowed: Optional[torch.Tensor] = None,
                     thought_markers: Optional[tuple] = None) -> torch.Tensor:
    """text [B, S+1] -> t [B], uniform over positions that are >= min_prefix tokens into their own
    document (packing.positions_in_document), whose target text[t] is not <eod>, and (with
    `thought_markers` = (<think>, </think>) ids) that are neither inside a written thought nor
    right after one (that context already ends in a thought). `allowed` narrows further (RPT's
    entropy filter) unless it leaves nothing. A window with no such position (only short
    documents) falls back to the position deepest into its document."""
    b, n = text.shape
    if n - 1 < min_prefix:
        raise ValueError(f"--rlp-min-prefix={min_prefix} leaves no position in sequences of "
                         f"{n - 1} tokens; lower it or raise --seq-length")
    offset = positions_in_document(document_ids(text, eod))
    usable = text != eod
    if thought_markers is not None:
        in_thought = thought_spans(text, *thought_markers)
        after_thought = torch.zeros_like(in_thought)
        after_thought[:, 1:] = text[:, :-1] == thought_markers[1]
        usable &= ~(in_thought | after_thought)
    ok = usable & (offset >= min_prefix)
    if allowed is not None:
        filtered = ok & allowed
        ok = torch.where(filtered.any(dim=1, keepdim=True), filtered, ok)
    for row in (~ok.any(dim=1)).nonzero()[:, 0].tolist():
        depth = torch.where(usable[row], offset[row], -1)
        if int(depth.max()) < 1:
            raise ValueError(f"RLP sample {row} holds no document with a token after its first "
                             "(nothing to predict from inside one document)")
        ok[row, int(depth.argmax())] = True
    return torch.multinomial(ok.float(), 1, generator=generator)[:, 0]


def document_contexts(text: torch.Tensor, t: torch.Tensor, eod: int,
                      max_context: Optional[int] = None) -> List[List[int]]:
    """The context x_<t of each row: from t's document start (packing.positions_in_document; the
    window start when the window cut the document), the last `max_context` tokens of it."""
    offset = positions_in_document(document_ids(text, eod))
    out = []
    for b in range(text.shape[0]):
        end = int(t[b])
        start = end - int(offset[b, end])
        if max_context:
            start = max(start, end - max_context)
        out.append(text[b, start:end].tolist())
    return out


def document_continuation(row: List[int], eod: int, length: int) -> List[int]:
    """The first `length` tokens of `row` up to and including its document's <eod>."""
    row = row[:length]
    return row[: row.index(eod) + 1] if eod in row else row


@torch.no_grad()
def teacher_target_logprobs(teacher, contexts: List[List[int]], targets: torch.Tensor,
                            vocab_size: int, pad: int) -> torch.Tensor:
    """log p_phi(x_t | x_<t) for each context (right-padded batch; causal, so padding is inert)."""
    device = next(teacher.parameters()).device
    width = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), width), pad, dtype=torch.long)
    for i, c in enumerate(contexts):
        ids[i, : len(c)] = torch.tensor(c)
    logits = teacher(ids.to(device), None, None)                       # [B, W, V/tp]
    last = torch.tensor([len(c) - 1 for c in contexts], device=device)
    picked = logits[torch.arange(len(contexts), device=device), last]  # [B, V/tp]
    return token_logprobs(picked, targets.to(device), vocab_size).cpu()


@torch.no_grad()
def make_rollout(decoder, teacher, tokenizer, data: dict, rcfg, *, seed: int, first_sample: int,
                 pre: List[int], post: List[int]) -> Rollout:
    gen = rollout_generator(seed, first_sample)
    text = torch.cat([data["tokens"], data["labels"][:, -1:]], dim=1).long()
    vocab = tokenizer.vocab_size
    t_reward = time.perf_counter()
    allowed = None
    if rcfg.rlp_reward == "rpt" and rcfg.rlp_rpt_entropy_filter is not None:
        logits = teacher(text[:, :-1].to(next(teacher.parameters()).device), None, None)
        from megatron_rlp.rlp.reward import gathered_logits

        ent = top_k_entropy(gathered_logits(logits, vocab), 16)        # [B, S] predicts text[1:]
        allowed = torch.zeros_like(text, dtype=torch.bool)
        allowed[:, 1:] = (ent >= rcfg.rlp_rpt_entropy_filter).cpu()
    reward_s = time.perf_counter() - t_reward
    t = choose_positions(text, rcfg.rlp_min_prefix, tokenizer.eod, gen, allowed,
                         (tokenizer.think_start, tokenizer.think_end))
    contexts = document_contexts(text, t, tokenizer.eod, rcfg.rlp_max_context)
    truth = [document_continuation(text[b, int(t[b]):].tolist(), tokenizer.eod,
                                   rcfg.rlp_rpt_truth_tokens) for b in range(text.shape[0])]
    targets = text[torch.arange(text.shape[0]), t]

    t0 = time.perf_counter()
    teacher_logp = teacher_target_logprobs(teacher, contexts, targets, vocab, tokenizer.pad)
    reward_s += time.perf_counter() - t0

    prompts = [pre + c + post + [tokenizer.think_start] for c in contexts]
    g = rcfg.rlp_num_thoughts
    t0 = time.perf_counter()
    out = generate(decoder, prompts, max_new_tokens=rcfg.rlp_thought_length, num_samples=g,
                   temperature=rcfg.rlp_temperature, top_p=rcfg.rlp_top_p, top_k=rcfg.rlp_top_k,
                   stop_ids=[tokenizer.think_end], generator=gen, pad_id=tokenizer.pad)
    rollout_s = time.perf_counter() - t0

    # Rows are built on the host: bring the samples over once, not one element per row.
    sampled, lengths, stopped, logprobs = (x.cpu() for x in (out.tokens, out.lengths,
                                                             out.stopped, out.logprobs))
    rows, masks, slps, tpos = [], [], [], []
    for r in range(len(prompts) * g):
        b, k = r // g, int(lengths[r])
        thought = sampled[r, :k].tolist()
        closing = [] if bool(stopped[r]) else [tokenizer.think_end]
        row = prompts[b] + thought + closing + [int(targets[b])]
        p = len(prompts[b])
        rows.append(row)
        masks.append((p - 1, k))
        slps.append(logprobs[r, :k])
        tpos.append(len(row) - 2)
    width = max(len(x) for x in rows)
    n = len(rows)
    tokens = torch.full((n, width), tokenizer.pad, dtype=torch.long)
    thought_mask = torch.zeros(n, width)
    sampler_logp = torch.zeros(n, width)
    for r, row in enumerate(rows):
        tokens[r, : len(row)] = torch.tensor(row)
        start, k = masks[r]
        thought_mask[r, start: start + k] = 1.0
        sampler_logp[r, start: start + k] = slps[r]
    labels = torch.cat([tokens[:, 1:], torch.full((n, 1), tokenizer.pad)], dim=1)

    ref_logp = None
    if rcfg.rlp_kl_beta:
        t0 = time.perf_counter()
        dev = next(teacher.parameters()).device
        ref_logp = (token_logprobs(teacher(tokens.to(dev), None, None), labels.to(dev), vocab,
                                   rcfg.rlp_temperature) * thought_mask.to(dev)).cpu()
        reward_s += time.perf_counter() - t0
    return Rollout(tokens=tokens, labels=labels, thought_mask=thought_mask,
                   target_pos=torch.tensor(tpos), targets=targets, teacher_logp=teacher_logp,
                   sampler_logp=sampler_logp, thought_len=lengths,
                   stopped=stopped, num_thoughts=g, truth=truth,
                   context_tokens=sum(len(c) for c in contexts),
                   generated_tokens=int(out.lengths.sum()), rollout_s=rollout_s,
                   reward_s=reward_s, ref_logp=ref_logp)
