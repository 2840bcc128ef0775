"""Chunked SSD scan vs the sequential recurrence on CPU (fp32, forward only).

Shape: batch 1, 8 heads x head_dim 64, state 64, 1 group (a small realistic Mamba2 layer).
For each length, times both in one process after a warm-up, prints the speed ratio, the max abs
error of the chunked outputs/final state against the recurrence (and of both against an fp64 run), and the chunked scan's share of the machine's
measured fp32 matmul throughput. Ends with one JSON line.

    python benchmarks/mamba2_scan.py [--lengths 256 1024 4096] [--chunk-size 64] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from megatron_rlp.models.ssd import ssd_scan_chunked, ssd_scan_reference


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_gflops() -> float:
    """Measured fp32 GEMM throughput of this machine: the practical ceiling."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    t = best_time(lambda: a @ b, 5)
    return 2 * 1024**3 / t / 1e9


def chunked_flops(L, h, p, n, T) -> float:
    """Leading matmul FLOPs of the chunked algorithm (intra-chunk CB and scores@X, chunk states,
    state outputs); the c x c inter-chunk pass is negligible."""
    return 2 * L * T * n + 2 * h * L * T * p + 2 * 2 * h * L * p * n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--state-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    h, p, n, T = args.heads, args.head_dim, args.state_dim, args.chunk_size
    peak = matmul_gflops()
    print(f"threads={torch.get_num_threads()} fp32 matmul ceiling={peak:.1f} GFLOP/s "
          f"shape: b=1 h={h} p={p} n={n} chunk={T}")
    results = {}
    g = torch.Generator().manual_seed(0)
    for L in args.lengths:
        x = torch.randn(1, L, h, p, generator=g)
        dt = torch.nn.functional.softplus(torch.randn(1, L, h, generator=g) - 3)
        A = -torch.exp(torch.rand(h, generator=g) * 2.77)
        B = torch.randn(1, L, 1, n, generator=g)
        C = torch.randn(1, L, 1, n, generator=g)
        with torch.no_grad():
            y_ref, s_ref = ssd_scan_reference(x, dt, A, B, C)
            y, s = ssd_scan_chunked(x, dt, A, B, C, T)
            err = max((y - y_ref).abs().max().item(), (s - s_ref).abs().max().item())
            y64, _ = ssd_scan_chunked(*(t.double() for t in (x, dt, A, B, C)), T)  # fp64 truth
            err64_chk = (y.double() - y64).abs().max().item()
            err64_ref = (y_ref.double() - y64).abs().max().item()
            reps = 3 if L <= 1024 else 1
            t_ref = best_time(lambda: ssd_scan_reference(x, dt, A, B, C), reps)
            t_chk = best_time(lambda: ssd_scan_chunked(x, dt, A, B, C, T), 5)
        share = chunked_flops(L, h, p, n, T) / t_chk / 1e9 / peak
        ratio = t_ref / t_chk
        print(f"L={L:5d}  recurrence {t_ref * 1e3:8.1f} ms  chunked {t_chk * 1e3:7.2f} ms  "
              f"speed-up {ratio:6.1f}x  max|err| {err:.2e} (vs fp64: chunked {err64_chk:.1e}, "
              f"recurrence {err64_ref:.1e}; max|y| {y64.abs().max().item():.1f})  "
              f"chunked at {share:.0%} of matmul ceiling")
        results[str(L)] = {"recurrence_ms": round(t_ref * 1e3, 2), "chunked_ms": round(t_chk * 1e3, 3),
                           "speedup": round(ratio, 2), "max_abs_err": err,
                           "chunked_err_vs_fp64": err64_chk, "recurrence_err_vs_fp64": err64_ref,
                           "share_of_matmul_ceiling": round(share, 3)}
    print(json.dumps({"benchmark": "mamba2_scan", "chunk_size": T, "heads": h, "head_dim": p,
                      "state_dim": n, "threads": torch.get_num_threads(),
                      "matmul_gflops": round(peak, 1), "results": results}))


if __name__ == "__main__":
    main()
