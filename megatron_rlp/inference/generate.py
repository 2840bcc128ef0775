"""Batched generation over the cached decoder: prefill each prompt once, copy its state to
`num_samples` continuations, decode all rows together, drop rows as they stop.

Rows = prompts x samples, prompt-major (row r continues prompt r // num_samples). Under tensor
parallelism every rank runs the same code; sampled tokens are broadcast from the first rank of the
TP group so all ranks hold identical sequences even if their logits differ in the last bit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from megatron_rlp.device import broadcast

from .cache import HybridCache
from .decode import CachedDecoder, full_logits
from .sampling import sample_next


@dataclass
class Generation:
    tokens: torch.Tensor        # [n, T] generated ids, `pad_id` after a row stops
    lengths: torch.Tensor       # [n] generated tokens per row, the stop token included
    stopped: torch.Tensor       # [n] bool: the row ended on a stop token (else hit the limit)
    logprobs: torch.Tensor      # [n, T] sampler log-probs log p_T(token) (0 in padding)
    decoded_tokens: int         # tokens run through the model (prefill + steps)
    seconds: float
    step_logits: Optional[List[torch.Tensor]] = None  # per step [n_active, V], if asked

    @property
    def tokens_per_s(self) -> float:
        return float(self.lengths.sum()) / max(self.seconds, 1e-9)


def _tp_sync(tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return tokens
    return broadcast(tokens, parallel_state.get_tensor_model_parallel_src_rank(),
                     group=parallel_state.get_tensor_model_parallel_group())


@torch.no_grad()
def generate(decoder: CachedDecoder, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             num_samples: int = 1, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             stop_ids: Sequence[int] = (), generator: Optional[torch.Generator] = None,
             pad_id: int = 0, keep_logits: bool = False) -> Generation:
    start = time.perf_counter()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one non-empty prompt")
    if max_new_tokens < 1 or num_samples < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and num_samples ({num_samples}) "
                         "must be >= 1")
    device = decoder.model.embedding.word_embeddings.weight.device
    firsts, caches = [], []
    for prompt in prompts:  # each prefix once; lengths differ, so one row per call
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        logits, cache = decoder.prefill(ids, capacity=len(prompt) + max_new_tokens)
        firsts.append(logits[:, -1])
        caches.append(cache)
    cache = HybridCache.concat(caches).repeat_rows(num_samples)
    logits = torch.cat(firsts).repeat_interleave(num_samples, dim=0)
    n = logits.shape[0]
    tokens = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(n, max_new_tokens, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    stopped = torch.zeros(n, dtype=torch.bool, device=device)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    active = torch.arange(n, device=device)
    step_logits = [] if keep_logits else None
    decoded = sum(len(p) for p in prompts)
    for t in range(max_new_tokens):
        if keep_logits:
            step_logits.append(logits)
        tok, lp = sample_next(logits, temperature, top_p, top_k, generator)
        tok = _tp_sync(tok)
        tokens[active, t] = tok
        logprobs[active, t] = lp
        lengths[active] += 1
        done = torch.isin(tok, stop) if len(stop) else torch.zeros_like(tok, dtype=torch.bool)
        stopped[active[done]] = True
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero()[:, 0]
            cache = cache.index_rows(keep)
            active, tok = active[keep], tok[keep]
        logits = decoder.step(tok, cache)
        decoded += int(tok.shape[0])
    return Generation(tokens, lengths, stopped, logprobs, decoded,
                      time.perf_counter() - start, step_logits)


@torch.no_grad()
def generate_uncached(model, vocab_size: int, prompts: Sequence[Sequence[int]], *,
                      max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0,
                      top_p: float = 1.0, top_k: int = 0, stop_ids: Sequence[int] = (),
                      generator: Optional[torch.Generator] = None, pad_id: int = 0,
                      keep_logits: bool = False) -> Generation:
    """The baseline: re-run the full forward over each whole sequence at every step (same API;
    rows of one prompt share a length, so they are batched per prompt)."""
    start = time.perf_counter()
    device = next(model.parameters()).device
    n = len(prompts) * num_samples
    tokens = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(n, max_new_tokens, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    stopped = torch.zeros(n, dtype=torch.bool, device=device)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    seqs = [list(prompts[r // num_samples]) for r in range(n)]
    step_logits = [] if keep_logits else None
    decoded = 0
    active = list(range(n))
    for t in range(max_new_tokens):
        rows_logits = []
        for p in range(len(prompts)):  # rows of one prompt have equal length: batch them
            rows = [r for r in active if r // num_samples == p]
            if rows:
                ids = torch.tensor([seqs[r] for r in rows], dtype=torch.long, device=device)
                rows_logits.append(full_logits(model, ids, vocab_size)[:, -1])
                decoded += ids.numel()
        logits = torch.cat(rows_logits)
        if keep_logits:
            step_logits.append(logits)
        tok, lp = sample_next(logits, temperature, top_p, top_k, generator)
        idx = torch.tensor(active, device=device)
        tokens[idx, t] = tok
        logprobs[idx, t] = lp
        lengths[idx] += 1
        done = torch.isin(tok, stop) if len(stop) else torch.zeros_like(tok, dtype=torch.bool)
        stopped[idx[done]] = True
        for r, x in zip(active, tok.tolist()):
            seqs[r].append(x)
        active = [r for r, d in zip(active, done.tolist()) if not d]
        if not active:
            break
    return Generation(tokens, lengths, stopped, logprobs, decoded,
                      time.perf_counter() - start, step_logits)
