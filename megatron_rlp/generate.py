"""`megatron-rlp-generate`: sample a continuation from a checkpoint with the cached decoder.

    megatron-rlp-generate --load runs/tiny --prompt "12+7=" --max-new-tokens 32 --temperature 0.7

The checkpoint may have any TP/PP layout (it is gathered into one CPU process). Prints the prompt
followed by the continuation; `--num-samples N` prints N continuations.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-rlp-generate", description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="Checkpoint directory (with a 'latest' file).")
    p.add_argument("--prompt", required=True, help="Text to continue.")
    p.add_argument("--max-new-tokens", type=int, default=64, help="Tokens to generate at most.")
    p.add_argument("--temperature", type=float, default=1.0, help="0 means greedy.")
    p.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass.")
    p.add_argument("--top-k", type=int, default=0, help="Keep the k most likely tokens (0: all).")
    p.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    p.add_argument("--num-samples", type=int, default=1, help="Continuations to print.")
    p.add_argument("--stop-at-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="Stop a sample at the end-of-document token.")
    return p


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 64,
                  temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                  num_samples: int = 1, stop_ids=None,
                  seq_length: Optional[int] = None) -> list[str]:
    """Continuations of `prompt` from a `load_model` model (or any wrapped MambaModel).
    `seq_length` (the run's --seq-length): a longer prompt is refused, since the model never saw
    positions past it and would continue it silently in a regime it was not trained for."""
    from megatron_rlp.inference.decode import CachedDecoder
    from megatron_rlp.inference.generate import generate

    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("--prompt encodes to no tokens; give some text")
    if seq_length is not None and len(ids) > seq_length:
        raise ValueError(f"--prompt is {len(ids)} tokens, longer than the model's --seq-length "
                         f"{seq_length} (the longest context it was trained on); shorten it")
    if seq_length is not None and len(ids) + max_new_tokens > seq_length:
        print(f"note: prompt ({len(ids)} tokens) + --max-new-tokens {max_new_tokens} runs past "
              f"the model's --seq-length {seq_length}; tokens beyond it are out of training "
              "range", file=sys.stderr, flush=True)
    stop_ids = [tokenizer.eod] if stop_ids is None else stop_ids
    result = generate(CachedDecoder(model, tokenizer.vocab_size), [ids],
                      max_new_tokens=max_new_tokens, num_samples=num_samples,
                      temperature=temperature, top_p=top_p, top_k=top_k, stop_ids=stop_ids,
                      generator=torch.Generator().manual_seed(seed), pad_id=tokenizer.pad)
    texts = []
    for row in range(num_samples):
        n = int(result.lengths[row]) - int(result.stopped[row])  # drop the stop token itself
        texts.append(tokenizer.decode(result.tokens[row, :n].tolist()))
    return texts


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_rlp.cli import run_main

    return run_main("megatron-rlp-generate", lambda: _generate(args))


def _generate(args) -> None:
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise ValueError("--max-new-tokens and --num-samples must be >= 1")
    from megatron_rlp.data.tokenizer import build_tokenizer
    from megatron_rlp.loading import load_model

    model = load_model(args.load)
    d = model.run_config.data
    tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model)
    texts = generate_text(model.model, tokenizer, args.prompt,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                          num_samples=args.num_samples,
                          stop_ids=[tokenizer.eod] if args.stop_at_eod else [],
                          seq_length=model.run_config.training.seq_length)
    for text in texts:
        print(args.prompt + text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
