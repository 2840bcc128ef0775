"""Per-step training time of the tiny hybrid model: TP=1 (1 rank) vs TP=2 vs DP=2 (2 CPU ranks).

    python benchmarks/parallel_step.py [--steps 6] [--warmup 2]

Each layout runs in its own torchrun job on gloo with the same global batch (so DP=2 does half the
micro-batches per rank), warms up, then times optimizer steps. Prints each layout's seconds per
step, the ratios to TP=1 (speed-up; the ceiling with 2 ranks is 2.0x), and one JSON line.
Every rank runs one thread (OMP_NUM_THREADS=1), so TP=1 uses one core and the 2-rank layouts two.
On 2 CPU cores TP pays an all-reduce per layer on small matrices, DP one gradient all-reduce per step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--num-layers", "6", "--hybrid-override-pattern", "M*M-M-", "--hidden-size", "256",
         "--ffn-hidden-size", "1024", "--num-attention-heads", "8", "--num-query-groups", "2",
         "--mamba-num-heads", "8", "--mamba-head-dim", "64", "--mamba-state-dim", "32",
         "--mamba-num-groups", "2", "--seq-length", "256", "--micro-batch-size", "4",
         "--global-batch-size", "16", "--lr-warmup-iters", "1"]
LAYOUTS = {"tp1": (1, []), "tp2": (2, ["--tensor-model-parallel-size", "2"]), "dp2": (2, [])}


def worker(flags: list, warmup: int, steps: int) -> None:
    from megatron_rlp.config import parse_args
    from megatron_rlp.train import build_run
    from megatron_rlp.training.distributed import destroy_distributed

    import torch.distributed as dist

    cfg = parse_args(flags + ["--train-iters", str(warmup + steps)])
    run = build_run(cfg)
    for chunk in run.model:
        chunk.train()
    for _ in range(warmup):
        run.trainer.train_step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        run.trainer.train_step()
    dist.barrier()
    seconds = (time.perf_counter() - start) / steps
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"s_per_step": seconds}), flush=True)
    destroy_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.warmup, args.steps)
        return

    scratch = tempfile.mkdtemp(prefix="parallel_step_")
    env = dict(os.environ, TMPDIR=scratch, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    data = ["--embedded-data-dir", os.path.join(scratch, "embedded")]
    results = {}
    for name, (nproc, flags) in LAYOUTS.items():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", os.path.abspath(__file__),
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--worker", *MODEL, *flags, *data]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if out.returncode or line is None:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(line[len("RESULT "):])["s_per_step"]
        print(f"{name}: {results[name] * 1000:.1f} ms/step ({nproc} rank{'s' if nproc > 1 else ''})",
              flush=True)
    ratios = {f"{k}_speedup_vs_tp1": results["tp1"] / results[k] for k in ("tp2", "dp2")}
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x (ceiling 2.00x with 2 ranks: {value / 2:.0%} of it)")
    print(json.dumps({"benchmark": "parallel_step", "cpu_count": os.cpu_count(),
                      "s_per_step": results, **ratios}))


if __name__ == "__main__":
    main()
