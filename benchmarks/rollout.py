"""Rollout throughput: cached (KV + Mamba state) vs uncached (full recompute per token) generation
of 256-token thoughts on the tiny model, and where the time of one RLP iteration goes.

    python benchmarks/rollout.py [--thought-length 256] [--contexts 2] [--samples 4]

Both generators run in this process after a warm-up, from the same seed; the uncached baseline is
the model's own forward over the whole sequence at every step. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import torch

TINY = ["--num-layers", "6", "--hybrid-override-pattern", "M*M-M-", "--hidden-size", "128",
        "--ffn-hidden-size", "512", "--num-attention-heads", "4", "--num-query-groups", "2",
        "--mamba-num-heads", "8", "--mamba-head-dim", "32", "--mamba-state-dim", "32",
        "--mamba-num-groups", "2", "--seq-length", "128"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--thought-length", type=int, default=256)
    p.add_argument("--prompt-length", type=int, default=64)
    p.add_argument("--contexts", type=int, default=2)
    p.add_argument("--samples", type=int, default=4, help="G thoughts per context")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings)")
    p.add_argument("--rlp-iters", type=int, default=2, help="RLP iterations timed for the shares")
    p.add_argument("--embedded-data-dir", default=None)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    torch.set_num_threads(args.threads)

    from megatron_rlp.config import parse_args
    from megatron_rlp.inference.decode import CachedDecoder
    from megatron_rlp.inference.generate import generate, generate_uncached
    from megatron_rlp.train import build_run

    data_dir = args.embedded_data_dir or os.path.join(tempfile.gettempdir(), "megatron_rlp_bench_emb")
    cfg = parse_args(TINY + [
        "--stage", "rlp", "--micro-batch-size", str(args.contexts), "--train-iters", "100",
        "--rlp-num-thoughts", str(args.samples), "--rlp-thought-length", str(args.thought_length),
        "--rlp-prompt-template", "{context}", "--rlp-max-context", str(args.prompt_length),
        "--lr", "1e-6", "--min-lr", "1e-6", "--lr-decay-style", "constant",
        "--lr-warmup-iters", "0", "--embedded-data-dir", data_dir])
    run = build_run(cfg)
    model, vocab = run.model[0], run.tokenizer.vocab_size
    decoder = CachedDecoder(model, vocab)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, vocab, (args.prompt_length,), generator=g).tolist()
               for _ in range(args.contexts)]
    kw = dict(max_new_tokens=args.thought_length, num_samples=args.samples, temperature=0.7)

    generate(decoder, prompts, **dict(kw, max_new_tokens=8))                     # warm-up
    generate_uncached(model, vocab, prompts, **dict(kw, max_new_tokens=8))
    cached = generate(decoder, prompts, generator=torch.Generator().manual_seed(1), **kw)
    uncached = generate_uncached(model, vocab, prompts, generator=torch.Generator().manual_seed(1),
                                 **kw)
    match = float((cached.tokens == uncached.tokens).all(dim=1).float().mean())

    # One RLP iteration: rollout (cached sampling), reward (teacher forwards), update (the rest).
    trainer, stage = run.trainer, run.trainer.stage
    callback = next(c for c in trainer.callbacks if type(c).__name__ == "RLPCallback")
    callback.on_train_start(trainer)
    for k in stage.stats:
        stage.stats[k] = 0.0
    start = time.perf_counter()
    for _ in range(args.rlp_iters):
        callback.on_iteration_start(trainer, trainer.iteration)
        trainer.train_step()
    total = time.perf_counter() - start
    s = stage.stats
    rollout, reward = s["rollout_s"], s["reward_s"]
    result = {
        "thought_length": args.thought_length, "rows": args.contexts * args.samples,
        "cached_tokens_per_s": round(cached.tokens_per_s, 1),
        "uncached_tokens_per_s": round(uncached.tokens_per_s, 1),
        "speedup": round(cached.tokens_per_s / uncached.tokens_per_s, 2),
        "rows_identical_frac": match,
        "rlp_iter_s": round(total / args.rlp_iters, 3),
        "rollout_share": round(rollout / total, 3), "reward_share": round(reward / total, 3),
        "update_share": round(max(total - rollout - reward, 0.0) / total, 3),
        "threads": args.threads,
    }
    print(f"cached {result['cached_tokens_per_s']} tok/s vs uncached "
          f"{result['uncached_tokens_per_s']} tok/s: {result['speedup']}x; RLP iteration "
          f"{result['rlp_iter_s']} s = rollout {result['rollout_share']:.0%} + reward "
          f"{result['reward_share']:.0%} + update {result['update_share']:.0%}")
    print(json.dumps(result), flush=True)
    from megatron_rlp.training.distributed import destroy_distributed

    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
