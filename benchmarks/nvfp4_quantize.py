"""NVFP4 quantization throughput: reference vs Triton (GPU) vs torchao, and share of copy bandwidth.

    python benchmarks/nvfp4_quantize.py            # 8192x8192 and 16384x5120 bf16
    python benchmarks/nvfp4_quantize.py --quick    # small shapes (CPU-friendly)

GB/s counts the minimum traffic of one quantization: read x once (2 B/elem for bf16) and write the
packed nibbles (0.5 B/elem) and scales (1/16 B/elem). Kernels that read x twice (amax pass, then
quantize) are charged the same bytes, so the number is directly comparable to the device's copy
bandwidth (measured here with ``dst.copy_(src)``, 2 x bytes per copy). Targets on GPU: 1D quantize
>= 80% of copy bandwidth, fused RHT + amax + quantize >= 40%.

The global amax needs a full read of x before any block scale is known, so a quantizer that also
computes it reads x twice and, charged one read, cannot pass ~56% of copy bandwidth
(2.56 / 4.56 B/elem). ``1d`` includes that amax pass; ``1d_amax_given`` is the quantize pass alone
(amax supplied, as after a TP all-reduce or from the producing op), the number the 80% target is
about (the amax reduction may be a separate pass). The RHT modes include their amax pass.

Also prints the CPU step-time ratio of one NVFP4-emulated linear (fwd+bwd) vs a BF16 linear.
The last line is one JSON object with every number.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_rlp.kernels import nvfp4  # noqa: E402


def _sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def bench(fn, dev, reps, warmup=2):
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(dev, nbytes, reps):
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), dev, reps)
    return 2 * nbytes / t / 1e9


def torchao_quantizer():
    """torchao's NVFP4 quantization (amax -> per-tensor scale -> to_nvfp4), or None."""
    try:
        from torchao.prototype.mx_formats.nvfp4_tensor import (NVFP4Tensor,
                                                               per_tensor_amax_to_scale)
    except Exception as e:  # noqa: BLE001 - optional dependency, report why it is absent
        return None, f"{type(e).__name__}: {e}"[:120]

    def run(x, use_triton):
        scale = per_tensor_amax_to_scale(x.abs().amax().float())
        return NVFP4Tensor.to_nvfp4(x, per_tensor_scale=scale, use_triton_kernel=use_triton)
    return run, None


def linear_step_ratio(reps):
    """CPU: NVFP4-emulated linear fwd+bwd time / BF16 linear fwd+bwd time (tiny-model shape)."""
    from megatron_rlp.quant import NVFP4Recipe, nvfp4_linear
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 256, generator=g).bfloat16()
    w = (torch.randn(1024, 256, generator=g) * 0.05).bfloat16()
    dy = torch.randn(512, 1024, generator=g).bfloat16()
    recipe = NVFP4Recipe(fp4="nvfp4")

    def step(fp4):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = nvfp4_linear(xi, wi, recipe=recipe, sr_seed=1) if fp4 else xi @ wi.t()
        y.backward(dy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # one thread: stable on a shared machine, fair to both sides
    try:
        t4 = bench(lambda: step(True), "cpu", reps, warmup=1)
        t16 = bench(lambda: step(False), "cpu", reps, warmup=1)
    finally:
        torch.set_num_threads(threads)
    return t4 / t16, t4, t16


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (1024x1024, 2048x640)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 20 GPU, "
                                                          "3 CPU)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    reps = args.reps or (20 if dev == "cuda" else 3)
    shapes = [(1024, 1024), (2048, 640)] if args.quick else [(8192, 8192), (16384, 5120)]
    ao, ao_err = torchao_quantizer()
    modes = {
        "1d": dict(),
        "1d_amax_given": dict(),       # amax filled in per shape below
        "1d_sr": dict(stochastic=True, seed=1),
        "2d": dict(block_2d=True),
        "rht_rows": dict(rht=True),
        "rht_cols_sr": dict(rht=True, stochastic=True, seed=1),    # Wgrad copy: x^T
    }
    backends = ["reference"] + (["triton"] if dev == "cuda" else [])
    result = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
              "torchao": ao_err or "available", "shapes": {}}
    if dev == "cuda":
        result["copy_GBps"] = copy_bandwidth(dev, 1 << 30, reps)
        print(f"copy bandwidth: {result['copy_GBps']:.0f} GB/s")
    for m, k in shapes:
        x = torch.randn(m, k, device=dev).bfloat16()
        modes["1d_amax_given"] = dict(amax=nvfp4.compute_amax(x))
        nbytes = m * k * 2 + m * k // 2 + m * k // 16
        rows = {}
        for be in backends:
            for mode, kw in modes.items():
                if be == "reference" and mode != "1d" and dev == "cpu" and not args.quick:
                    continue          # reference on CPU: one mode is enough to set the baseline
                src = x.t() if mode.startswith("rht_cols") else x
                t = bench(lambda: nvfp4.quantize(src, backend=be, **kw), dev,
                          reps if be == "triton" else max(1, reps // 4) if dev == "cuda" else reps)
                row = {"s": t, "GBps": nbytes / t / 1e9, "Gelem_per_s": m * k / t / 1e9}
                if "copy_GBps" in result:
                    row["frac_copy_bw"] = row["GBps"] / result["copy_GBps"]
                rows[f"{be}/{mode}"] = row
        if ao is not None:
            for use_triton in ([False, True] if dev == "cuda" else [False]):
                name = f"torchao/{'triton' if use_triton else 'torch'}"
                try:
                    t = bench(lambda: ao(x, use_triton), dev, reps)
                    rows[name] = {"s": t, "GBps": nbytes / t / 1e9, "Gelem_per_s": m * k / t / 1e9}
                except Exception as e:  # noqa: BLE001 - e.g. kernel needs sm100
                    rows[name] = {"error": f"{type(e).__name__}: {e}"[:160]}
        best = "triton/1d" if "triton/1d" in rows else "reference/1d"
        for name in ("torchao/triton", "torchao/torch"):
            if "s" in rows.get(name, {}):
                rows[f"ratio_{best}_vs_{name}"] = rows[name]["s"] / rows[best]["s"]
        result["shapes"][f"{m}x{k}"] = rows
        for name, row in rows.items():
            if isinstance(row, dict) and "s" in row:
                extra = f"  {row['frac_copy_bw']:.0%} of copy" if "frac_copy_bw" in row else ""
                print(f"{m}x{k} {name:<24} {row['s'] * 1e3:9.2f} ms {row['GBps']:8.2f} GB/s "
                      f"{row['Gelem_per_s']:7.3f} Gelem/s{extra}")
            else:
                print(f"{m}x{k} {name:<24} {row}")
    ratio, t4, t16 = linear_step_ratio(5)
    result["cpu_linear_step_ratio_nvfp4_vs_bf16"] = ratio
    print(f"CPU (1 thread) linear fwd+bwd 512x256x1024: NVFP4 emulated {t4 * 1e3:.1f} ms, BF16 "
          f"{t16 * 1e3:.1f} ms, ratio {ratio:.1f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
