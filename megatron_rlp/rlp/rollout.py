"""Rollouts: pick a position per document, build the prompt, sample G thoughts with the cached
decoder, and lay out the rows the training forward reads.

Per document (text = tokens of the sample plus its last label, S+1 tokens):
    t ~ Uniform{positions >= --rlp-min-prefix whose target is not <eod>}   (RPT filter optional)
    context  x_<t (the last --rlp-max-context tokens), target x_t
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


def choose_positions(text: torch.Tensor, min_prefix: int, eod: int, generator: torch.Generator,
                     allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """text [B, S+1] -> t [B]: uniform over t >= min_prefix with text[t] != eod (and `allowed`)."""
    b, n = text.shape
    if n - 1 < min_prefix:
        raise ValueError(f"--rlp-min-prefix={min_prefix} leaves no position in sequences of "
                         f"{n - 1} tokens; lower it or raise --seq-length")
    ok = torch.zeros_like(text, dtype=torch.bool)
    ok[:, min_prefix:] = True
    ok &= text != eod
    if allowed is not None:
        filtered = ok & allowed
        ok = torch.where(filtered.any(dim=1, keepdim=True), filtered, ok)
    ok[~ok.any(dim=1), -1] = True  # a sample of only <eod>: predict the last token anyway
    weights = ok.float()
    return torch.multinomial(weights, 1, generator=generator)[:, 0]


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
    t = choose_positions(text, rcfg.rlp_min_prefix, tokenizer.eod, gen, allowed)
    contexts, truth = [], []
    for b in range(text.shape[0]):
        ctx = text[b, : int(t[b])].tolist()
        if rcfg.rlp_max_context:
            ctx = ctx[-rcfg.rlp_max_context:]
        contexts.append(ctx)
        truth.append(text[b, int(t[b]): int(t[b]) + rcfg.rlp_rpt_truth_tokens].tolist())
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
