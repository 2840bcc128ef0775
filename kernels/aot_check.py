"""Compile every NVFP4 Triton kernel for real GPUs without one, and check the PTX numerics.

    python -m megatron_rlp.kernels.aot_check [--arch 90 100] [--json]

Triton ships ptxas, so kernels compile ahead of time (TTIR -> PTX -> cubin) on a CPU-only host.
That catches what the interpreter cannot: code that only fails to lower, and instructions whose
rounding differs from the op-by-op fp32 arithmetic of ``reference.py``:

- ``fma.*.f32``: a fused multiply-add rounds once where the reference rounds twice. Launches pass
  ``enable_fp_fusion=False``; this check proves no contraction slipped in.
- ``div.approx`` / ``div.full`` / ``rcp.approx`` on f32: approximate division (``/`` in Triton can
  lower to it); the kernels use ``tl.math.div_rn``.
- ``.ftz``: flushing subnormals to zero (a tiny global amax makes 1/S subnormal; the reference
  keeps it).

Every kernel variant the launchers in ``triton_nvfp4.py`` can request is compiled with the
compiled-mode block sizes of ``_blocks``. Exit status 1 if anything fails to compile, a forbidden
instruction appears, or a kernel spills registers to local memory (a streaming kernel that
spills cannot run at copy bandwidth). Registers per thread are printed: with 128 threads per
program they bound how many programs share an SM (65536 registers each on sm_90/sm_100). Must run with ``TRITON_INTERPRET`` unset (the interpreter replaces
the JIT functions this module compiles).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List

FORBIDDEN = re.compile(r"\b(fma\.[a-z.]*f32[a-z0-9]*|div\.(?:approx|full)\.[a-z.]*f32|"
                       r"rcp\.approx\.[a-z.]*f32|[a-z]+(?:\.[a-z0-9]+)*\.ftz(?:\.[a-z0-9]+)*)")
# Pointer element type of x per input dtype (bf16 tensors are passed as raw int16 bits).
X_PTR = {"bf16": "*i16", "fp32": "*fp32", "fp16": "*fp16"}
QUANTIZE_MODES = {                 # name -> (RHT, BLOCK_2D, STOCHASTIC)
    "1d": (False, False, False), "1d_sr": (False, False, True), "2d": (False, True, False),
    "rht": (True, False, False), "rht_sr": (True, False, True),
}


@dataclass
class Variant:
    kernel: str
    signature: Dict[str, str]
    constexprs: Dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    dtype: str = ""          # input dtype, for the name only

    @property
    def name(self) -> str:
        flags = [k for k, v in self.constexprs.items() if v is True and k != "IS_BF16"]
        return f"{self.kernel}[{','.join(([self.dtype] if self.dtype else []) + flags)}]"


def _ints(*names: str) -> Dict[str, str]:
    return {n: "i32" for n in names}


def variants() -> List[Variant]:
    """Every (kernel, constexpr) combination the launchers use, at compiled block sizes."""
    from . import triton_nvfp4 as T

    bm, bk, nw = T._blocks(1 << 20, 1 << 20)          # compiled sizes (not the interpreter's)
    tile = {"BM": bm, "BK": bk}
    out = []
    for dt, ptr in X_PTR.items():
        for rht in (False, True):
            if rht and dt == "fp16":
                continue                                 # rejected by nvfp4.quantize
            out.append(Variant("_amax_kernel", {"x_ptr": ptr, "part_ptr": "*fp32",
                                                "bad_ptr": "*i32",
                                                **_ints("M", "K", "stride_m", "stride_k", "n_k")},
                               {"RHT": rht, "IS_BF16": dt == "bf16", **tile}, nw, dt))
        for mode, (rht, two_d, sr) in QUANTIZE_MODES.items():
            if rht and dt == "fp16":
                continue
            out.append(Variant("_quantize_kernel",
                               {"x_ptr": ptr, "amax_ptr": "*fp32", "amax_out_ptr": "*fp32",
                                "q_ptr": "*u8", "s_ptr": "*u8",
                                **_ints("M", "K", "stride_m", "stride_k"), "seed": "i64"},
                               {"RHT": rht, "IS_BF16": dt == "bf16", "BLOCK_2D": two_d,
                                "STOCHASTIC": sr, **tile}, nw, dt))
        if dt != "fp16":
            out.append(Variant("_hadamard_kernel", {"x_ptr": ptr, "out_ptr": ptr,
                                                    **_ints("M", "K", "stride_m", "stride_k")},
                               {"IS_BF16": dt == "bf16", **tile}, nw, dt))
    out.append(Variant("_amax_reduce_kernel", {"part_ptr": "*fp32", "bad_ptr": "*i32", "n": "i32",
                                               "out_ptr": "*fp32"}, {"CHUNK": T._AMAX_CHUNK}))
    out.append(Variant("_dequantize_kernel", {"q_ptr": "*u8", "s_ptr": "*u8", "amax_ptr": "*fp32",
                                              "out_ptr": "*fp32", **_ints("M", "K")}, tile, nw))
    return out


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and local-memory (spill) bytes of a cubin, from Triton's cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                              text=True, check=True).stdout
    found = re.search(r"REG:(\d+).*?LOCAL:(\d+)", text)
    if not found:
        raise RuntimeError(f"cuobjdump printed no resource usage: {text[-300:]!r}")
    return {"regs": int(found.group(1)), "spill_bytes": int(found.group(2))}


def compile_variant(v: Variant, arch: int, fp_fusion: bool = False) -> dict:
    """Compile one variant to cubin for sm_<arch>; returns a report row. ``fp_fusion=True``
    compiles as a launch without ``enable_fp_fusion=False`` would (to see the check fire)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_nvfp4 as T

    fn = getattr(T, v.kernel)
    signature = dict(v.signature, **{k: "constexpr" for k in v.constexprs})
    start = time.perf_counter()
    row = {"kernel": v.name, "arch": arch}
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=v.constexprs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": v.num_warps,
                                           "enable_fp_fusion": fp_fusion})
    except Exception as error:  # noqa: BLE001 - reported per variant, the run goes on
        row.update(ok=False, error=f"{type(error).__name__}: {error}"[:400])
        return row
    ptx = compiled.asm["ptx"]
    forbidden = sorted(set(FORBIDDEN.findall(ptx)))
    usage = resource_usage(compiled.asm["cubin"])
    row.update(ok=not forbidden and usage["spill_bytes"] == 0, forbidden=forbidden,
               cubin_bytes=len(compiled.asm["cubin"]), **usage,
               seconds=round(time.perf_counter() - start, 2))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 100],
                        help="SM versions to compile for (90: Hopper, 100: Blackwell)")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot_check: unset TRITON_INTERPRET (the interpreter replaces the JIT functions)",
              file=sys.stderr)
        return 2
    rows = [compile_variant(v, arch) for arch in args.arch for v in variants()]
    for row in rows:
        if "error" in row:
            status = "FAIL " + row["error"]
        else:
            problems = row["forbidden"] + ([f"{row['spill_bytes']} B spilled"]
                                           if row["spill_bytes"] else [])
            status = (f"regs {row['regs']:3d}  " + ("ok" if row["ok"] else
                                                     "FAIL " + ", ".join(problems)))
        print(f"sm_{row['arch']:<4} {row['kernel']:<44} {status}")
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)}/{len(rows)} kernel variants compiled with exact fp32 "
          "arithmetic and no register spills")
    if args.json:
        print(json.dumps({"rows": rows, "failed": len(failed)}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
