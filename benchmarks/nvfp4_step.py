"""Training-step time of the tiny hybrid model: BF16 vs BF16 with NVFP4 blocks (CPU emulation).

    python benchmarks/nvfp4_step.py [--steps 10] [--warmup 2] [--threads 1] [--fp32]
                                    [--fp4-gemm auto|emulated|te]

Shape: examples/tiny_cpu.yaml (6 blocks M*M-M-, hidden 160, seq 128, micro-batch 8), one BF16
block at each edge, so blocks 1-4 run 6 NVFP4 linears (the Mamba in_proj, 776 rows, stays BF16).
Both runs are built in this process from the same seed and stepped alternately (baseline step,
NVFP4 step, ...), so load on a shared machine hits both alike; the medians are compared.

On CPU the NVFP4 GEMMs are emulated: bit-faithful quantization by the torch reference kernels,
then an fp32 matmul of the dequantized operands, so the ratio is the price of emulation, not a
speed-up. With ``--fp4-gemm auto`` (the default) a Blackwell GPU with TransformerEngine >= 2.14
runs TE's FP4 GEMMs instead; the result names the backend that ran. There is no physical
ceiling to share here; the model's achieved GFLOP/s (6 x params x tokens) is printed for scale.
The last line is one JSON object with every number.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def build(flags: list):
    from megatron_rlp.config import parse_args
    from megatron_rlp.train import build_run

    run = build_run(parse_args(flags))
    for callback in run.trainer.callbacks:
        callback.on_train_start(run.trainer)
    for chunk in run.model:
        chunk.train()
    return run


def step(run) -> float:
    start = time.perf_counter()
    for callback in run.trainer.callbacks:
        callback.on_iteration_start(run.trainer, run.trainer.iteration)
    run.trainer.train_step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: the emulated GEMMs degrade badly when "
                             "many threads share a busy CPU)")
    parser.add_argument("--fp32", action="store_true", help="fp32 model instead of BF16")
    parser.add_argument("--fp4-gemm", default="auto", choices=("auto", "emulated", "te"),
                        help="NVFP4 GEMM backend (auto: TransformerEngine where available)")
    args = parser.parse_args()

    import torch

    from megatron_rlp.quant import QUANT_STATS
    from megatron_rlp.train import _quiet_known_import_warnings
    from megatron_rlp.training.distributed import destroy_distributed

    torch.set_num_threads(args.threads)
    _quiet_known_import_warnings()
    iters = args.warmup + args.steps
    base_flags = ["--config", os.path.join(REPO, "examples", "tiny_cpu.yaml"),
                  "--train-iters", str(iters), "--eval-interval", "0", "--save-interval", "0"]
    if not args.fp32:
        base_flags.append("--bf16")
    fp4_flags = base_flags + ["--fp4", "nvfp4", "--fp4-bf16-first-layers", "1",
                              "--fp4-bf16-last-layers", "1", "--fp4-gemm", args.fp4_gemm]
    # Both runs share one world of one (init_distributed is idempotent), so they can alternate.
    baseline, candidate = build(base_flags), build(fp4_flags)
    times = {"baseline": [], "nvfp4": []}
    gemms_before = sum(QUANT_STATS.values())
    for i in range(iters):
        for name, run in (("baseline", baseline), ("nvfp4", candidate)):
            seconds = step(run)
            if i >= args.warmup:
                times[name].append(seconds)
    gemms_per_step = (sum(QUANT_STATS.values()) - gemms_before) / iters
    gemm, gemm_reason = next(cb.gemm for cb in candidate.trainer.callbacks if hasattr(cb, "gemm"))
    destroy_distributed()

    cfg = baseline.cfg
    params = sum(p.numel() for chunk in baseline.model for p in chunk.parameters())
    tokens = cfg.training.micro_batch_size * cfg.training.seq_length
    base_s, fp4_s = (statistics.median(times[k]) for k in ("baseline", "nvfp4"))
    dtype = "fp32" if args.fp32 else "bf16"
    result = {
        "model": "examples/tiny_cpu.yaml", "dtype": dtype, "threads": args.threads,
        "params": params, "tokens_per_step": tokens, "steps": args.steps,
        "baseline_s_per_step": base_s, "nvfp4_s_per_step": fp4_s, "ratio": fp4_s / base_s,
        "nvfp4_gemms_per_step": gemms_per_step, "fp4_gemm": gemm, "fp4_gemm_reason": gemm_reason,
        "baseline_gflops": 6 * params * tokens / base_s / 1e9,
        "nvfp4_gflops": 6 * params * tokens / fp4_s / 1e9,
    }
    print(f"tiny_cpu ({params / 1e6:.2f}M params, {tokens} tokens/step, {args.threads} thread(s)):"
          f" {dtype} {base_s * 1e3:.1f} ms/step, {dtype}+NVFP4 ({gemm} GEMMs: {gemm_reason}) "
          f"{fp4_s * 1e3:.1f} ms/step ({gemms_per_step:.0f} quantized GEMMs/step)")
    print(f"NVFP4 {gemm} / {dtype} step time: {fp4_s / base_s:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
