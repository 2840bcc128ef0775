"""Training throughput of one hybrid model on one device: tokens/s, and TFLOP/s and MFU where the
FLOP counter and the device's peak are known.

    python benchmarks/throughput.py                 # ~350M-parameter hybrid, seq 4096, bf16 (GPU)
    python benchmarks/throughput.py --tiny          # a few-layer model that runs on a CPU
    python benchmarks/throughput.py --steps 20 -- --hidden-size 2048 ...   # any train flag after --

Builds the real training run (`megatron_rlp.train.build_run`: model on this process's device,
megatron DDP and optimizer, the embedded corpus unless `--data-path` is passed after `--`), warms
up, then times full optimizer steps (forward, backward, all-reduce, Adam) with a device sync on
each side. Default shape: hidden 1024, 44 layers in Nemotron-H's mix (20 Mamba2, 20 MLP,
4 attention: "M-M-M-M*-" x4 + "M-M-M-M-"), Mamba2 32 heads x 64 with 8 groups and state 128,
GQA 8 heads / 2 groups, MLP 4096; with the embedded tokenizer (1,024 ids) that is ~0.35B
parameters (a 131k vocabulary would add ~0.27B). Tokens/s counts every token of the global batch;
TFLOP/s uses `megatron_rlp.training.flops.training_flops_per_iteration` (model FLOPs, 3x forward,
no recompute) and MFU its `peak_flops_per_device` (dense bf16 peak of the device).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHAPE_350M = ["--num-layers", "44", "--hybrid-override-pattern", "M-M-M-M*-" * 4 + "M-M-M-M-",
              "--hidden-size", "1024", "--ffn-hidden-size", "4096",
              "--num-attention-heads", "8", "--num-query-groups", "2", "--kv-channels", "128",
              "--mamba-num-heads", "32", "--mamba-head-dim", "64", "--mamba-state-dim", "128",
              "--mamba-num-groups", "8", "--mamba-chunk-size", "128"]
SHAPE_TINY = ["--num-layers", "4", "--hybrid-override-pattern", "M*M-", "--hidden-size", "64",
              "--ffn-hidden-size", "256", "--num-attention-heads", "4", "--num-query-groups", "2",
              "--mamba-num-heads", "4", "--mamba-head-dim", "16", "--mamba-state-dim", "16",
              "--mamba-num-groups", "2", "--mamba-chunk-size", "32"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="%(prog)s [options] [-- train flags]")
    parser.add_argument("--tiny", action="store_true", help="tiny shape, seq 128, for CPUs")
    parser.add_argument("--seq-length", type=int, default=None, help="default 4096 (tiny: 128)")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--fp32", action="store_true", help="fp32 instead of bf16 (CPU default)")
    parser.add_argument("train_flags", nargs="*", help="more megatron_rlp.train flags (after --)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # compile buys nothing on a CPU
    from megatron_rlp.config import parse_args
    from megatron_rlp.train import build_run
    from megatron_rlp.training.distributed import destroy_distributed

    seq = args.seq_length or (128 if args.tiny else 4096)
    bf16 = not args.fp32 and (torch.cuda.is_available() or not args.tiny)
    flags = (SHAPE_TINY if args.tiny else SHAPE_350M) + [
        "--seq-length", str(seq), "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(args.micro_batch_size),
        "--train-iters", str(args.warmup + args.steps), "--lr-warmup-iters", "1",
        "--log-interval", "1000000", "--seed", "1234",
        "--bf16" if bf16 else "--no-bf16"] + args.train_flags
    cfg = parse_args(flags)
    run = build_run(cfg)
    model = run.model
    params = sum(p.numel() for chunk in model for p in chunk.parameters())
    device = next(model[0].parameters()).device
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    for chunk in model:
        chunk.train()

    for _ in range(args.warmup):
        run.trainer.train_step()
    sync()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        record = run.trainer.train_step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps

    gbs = run.trainer.global_batch_size
    tokens_per_s = gbs * seq / seconds
    result = {"benchmark": "throughput", "device": torch.cuda.get_device_name(device)
              if on_gpu else "cpu", "params": params, "pattern": cfg.model.hybrid_override_pattern,
              "hidden_size": cfg.model.hidden_size, "seq_length": seq, "global_batch": gbs,
              "dtype": "bf16" if bf16 else "fp32", "steps": args.steps, "s_per_step": seconds,
              "tokens_per_s": tokens_per_s, "last_loss": record.get("loss"),
              "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if on_gpu else None}
    line = (f"throughput: {params / 1e6:.1f}M params ({cfg.model.hybrid_override_pattern}, hidden "
            f"{cfg.model.hidden_size}), seq {seq}, batch {gbs}, {result['dtype']}, "
            f"{result['device']}: {seconds * 1e3:.1f} ms/step, {tokens_per_s:,.0f} tokens/s")
    try:
        from megatron_rlp.training.flops import (matmul_precision, peak_flops_per_device,
                                                 training_flops_per_iteration)
    except ImportError:
        line += " (no megatron_rlp.training.flops: FLOP/s not computed)"
    else:
        flops = training_flops_per_iteration(cfg, gbs, run.tokenizer.vocab_size)
        tflops = flops / seconds / 1e12
        result["tflops"] = tflops
        line += f", {tflops:.3g} TFLOP/s (model FLOPs)"
        peak = peak_flops_per_device(device, matmul_precision(bf16)) if on_gpu else None
        if peak:
            result["mfu"] = flops / seconds / peak
            result["peak_tflops"] = peak / 1e12
            line += f", MFU {result['mfu']:.1%} of {peak / 1e12:.0f} TFLOP/s"
    print(line, flush=True)
    destroy_distributed()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
