"""The NVFP4 Triton kernels compile for Hopper and Blackwell on this CPU-only machine (Triton ships
ptxas), and the PTX keeps the reference's fp32 rounding: no fused multiply-adds, no approximate
division; and no kernel spills registers (a spilling streaming kernel cannot reach copy
bandwidth). The interpreter, which the bit-exactness tests use here, can show none of these."""
import json
import os
import subprocess
import sys

from conftest import REPO_ROOT


def _run(args, code=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m",
                                                     "megatron_rlp.kernels.aot_check", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env,
                          cwd=REPO_ROOT)


def test_every_kernel_variant_compiles_for_sm90_and_sm100_with_exact_fp32_ops():
    result = _run(["--arch", "90", "100", "--json"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    rows = report["rows"]
    kernels = {r["kernel"].split("[")[0] for r in rows}
    assert kernels == {"_amax_kernel", "_amax_reduce_kernel", "_quantize_kernel",
                       "_dequantize_kernel", "_hadamard_kernel"}
    # 5 quantize modes for bf16 and fp32, 3 for fp16; both architectures
    assert sum(r["kernel"].startswith("_quantize_kernel") for r in rows) == 2 * 13
    assert report["failed"] == 0 and all(r["cubin_bytes"] > 0 for r in rows)
    assert all(r["spill_bytes"] == 0 and 0 < r["regs"] <= 255 for r in rows)


def test_the_check_catches_fma_contraction_when_fusion_is_left_on():
    code = (
        "from megatron_rlp.kernels import aot_check as A\n"
        "v = next(v for v in A.variants() if v.name == '_quantize_kernel[bf16,RHT,STOCHASTIC]')\n"
        "row = A.compile_variant(v, 100, fp_fusion=True)\n"
        "print(row['ok'], row['forbidden'])\n")
    result = _run([], code)
    assert result.returncode == 0, result.stderr[-3000:]
    ok, forbidden = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert ok == "False" and "fma.rn.f32" in forbidden
