"""Rewards for a thought, and the token log-probs they are computed from.

info_gain (RLP):  r = log p_theta(x_t | x_<t, c) - log p_phi(x_t | x_<t)     (no gradient)
rpt (RPT, Dong et al. 2025): r = 1 iff the prediction's bytes are a prefix of the true
  continuation's bytes AND end exactly on one of its token boundaries, else 0. Our prediction is
  the single most likely token after </think> (RPT lets the model write a boxed answer of any
  length; with one predicted token the boundary rule still accepts a merged token that spans
  several true tokens). RPT's position filter keeps positions whose proxy-model entropy over the
  top-16 next tokens is high; our proxy is the EMA teacher.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region


def info_gain_reward(logp_with_thought: torch.Tensor, logp_no_thought: torch.Tensor
                     ) -> torch.Tensor:
    """r = log p_theta(x_t | x_<t, c) - log p_phi(x_t | x_<t), elementwise, no gradient."""
    return (logp_with_thought - logp_no_thought).detach()


def rpt_reward(prediction: bytes, truth_tokens: Sequence[bytes]) -> float:
    """1.0 iff `prediction` is non-empty, a byte-prefix of b"".join(truth_tokens), and its length
    is a token boundary of the truth (the end of truth token 1, 2, ...), else 0.0."""
    if not prediction:
        return 0.0
    boundary = 0
    for token in truth_tokens:
        boundary += len(token)
        if boundary == len(prediction):
            return 1.0 if b"".join(truth_tokens)[:boundary] == prediction else 0.0
        if boundary > len(prediction):
            return 0.0
    return 0.0


def token_bytes_table(tokenizer) -> List[bytes]:
    """The bytes each token id decodes to (byte-level BPE symbols mapped back to raw bytes)."""
    from megatron_rlp.data.tokenizer import bytes_to_unicode

    inverse = {ch: b for b, ch in bytes_to_unicode().items()}
    table = []
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.id_to_token(i) or ""
        if piece and all(ch in inverse for ch in piece):
            table.append(bytes(inverse[ch] for ch in piece))
        else:  # special tokens and non-byte-level vocabularies
            table.append(piece.encode("utf-8"))
    return table


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set the padding columns (global id >= vocab_size) of vocab-sharded logits to -inf-ish, so
    the training policy is the distribution the sampler drew from."""
    per_rank = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * per_rank
    ids = torch.arange(start, start + per_rank, device=logits.device)
    if int(ids[-1]) < vocab_size:
        return logits
    return logits.masked_fill(ids >= vocab_size, -1e30)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                   temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[target] for vocab-sharded logits [..., V/tp] (TP-correct through
    megatron's vocab-parallel cross entropy); differentiable."""
    z = mask_padded_vocab(logits.float() / temperature, vocab_size)
    return -vocab_parallel_cross_entropy(z, targets)


def gathered_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocab logits from TP shards, padding cut (no gradient needed by callers)."""
    return gather_from_tensor_model_parallel_region(logits)[..., :vocab_size]


def top_k_entropy(logits: torch.Tensor, k: int = 16) -> torch.Tensor:
    """Entropy (nats) of the renormalised top-k next-token distribution (RPT's filter)."""
    top = torch.log_softmax(logits.float().topk(min(k, logits.shape[-1]), dim=-1).values, dim=-1)
    return -(top.exp() * top).sum(dim=-1)
