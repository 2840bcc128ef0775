"""FLOP-matched next-token-prediction tokens (RLP paper, compute-matched baselines).

The paper compares RLP with continued pretraining at equal compute by counting, for the RLP run,
    T_flop = n * l_seq * bs * iters + T_inp
tokens: n rollouts (thoughts) per context, each of l_seq tokens (prompt + thought + target),
bs contexts per step, iters steps, plus T_inp, the input (context) tokens consumed. A continued
pretraining run that reads T_flop tokens spends about the same FLOPs (each token costs ~6P in
training; rollouts cost ~2P/token but the update re-reads them, so counting each rollout token
once is the paper's accounting, kept here as is).

We count actual lengths: sum over all rows of the sequence length in the training forward, plus
the context tokens read, accumulated over iterations.
"""
from __future__ import annotations


def ntp_equivalent_tokens(rollout_tokens: int, input_tokens: int) -> int:
    """T_flop for one step: rollout_tokens = sum over the n*bs rows of their sequence length
    (the paper's n * l_seq * bs), input_tokens = context tokens read (T_inp)."""
    return int(rollout_tokens) + int(input_tokens)
