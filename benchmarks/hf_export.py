"""Export benchmark: time and peak memory of `--to-hf` on a generated ~1B-parameter checkpoint.

    python benchmarks/hf_export.py [--workdir /tmp/hf_bench] [--layers 32] [--hidden 2048]

1. Generates (once; reused if present) a random fp32 checkpoint of a Nemotron-H-shaped hybrid
   (pattern M-M-...*, hidden 2048, ffn 8192, Mamba 64x64 heads, 8 groups) in the trainer's layout.
2. Runs the export in a fresh subprocess and reads its peak RSS (ru_maxrss), so the number is the
   converter's own, not the generator's.
Prints the ratio of peak RSS to the model's size in bytes (streaming keeps it well below 1: the
converter never holds the model, let alone two copies) and the write bandwidth, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss_bytes() -> int:
    """This process's own high-water RSS (VmHWM). Not ru_maxrss: Linux carries that across
    fork+exec, so a child of the (large) generator would report the generator's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def pattern_for(layers: int) -> str:
    """Nemotron-H-like: alternate Mamba and MLP, every 8th layer attention."""
    return "".join("*" if i % 8 == 5 else ("M" if i % 2 == 0 else "-") for i in range(layers))


def generate(ckpt: str, layers: int, hidden: int) -> int:
    import torch

    from megatron_rlp.config import config_from_dict
    from megatron_rlp.data.tokenizer import build_tokenizer
    from megatron_rlp.hf.import_ import save_weights_checkpoint
    from megatron_rlp.models.hybrid import build_model
    from megatron_rlp.training.distributed import init_distributed

    flat = config_from_dict(dict(
        num_layers=layers, hybrid_override_pattern=pattern_for(layers), hidden_size=hidden,
        ffn_hidden_size=4 * hidden, num_attention_heads=hidden // 128, num_query_groups=4,
        mamba_num_heads=hidden // 32, mamba_head_dim=64, mamba_state_dim=128,
        mamba_num_groups=8, mamba_chunk_size=128, seq_length=4096)).to_flat_dict()
    cfg = config_from_dict(flat)
    init_distributed(cfg.parallel, 0)
    with torch.no_grad():
        model = build_model(cfg, build_tokenizer().vocab_size)
    params = sum(p.numel() for p in model.parameters())
    save_weights_checkpoint(model, flat, ckpt, stage="pretrain")
    return params


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/hf_bench")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    ckpt, out = os.path.join(args.workdir, "ckpt"), os.path.join(args.workdir, "hf")

    if args.child:  # the measured process: export only
        from megatron_rlp.hf.export import export_to_hf

        report = export_to_hf(ckpt, out, max_shard_size=args.max_shard_size, overwrite=True)
        report["peak_rss_bytes"] = peak_rss_bytes()
        print("CHILD " + json.dumps(report))
        return

    if not os.path.exists(os.path.join(ckpt, "latest")):
        start = time.perf_counter()
        params = generate(ckpt, args.layers, args.hidden)
        print(f"generated {params / 1e9:.3f}B-parameter checkpoint in "
              f"{time.perf_counter() - start:.0f}s", flush=True)
    # Baseline: the same interpreter importing the converter and megatron, exporting nothing.
    base = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'benchmarks'); "
                           "import hf_export, megatron_rlp.hf.export, megatron.core; "
                           "print(hf_export.peak_rss_bytes())"], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    import_rss = int(base.stdout.strip().splitlines()[-1])
    start = time.perf_counter()
    child = subprocess.run([sys.executable, __file__, "--child", "--workdir", args.workdir,
                            "--max-shard-size", args.max_shard_size],
                           capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    line = next((l for l in child.stdout.splitlines() if l.startswith("CHILD ")), None)
    if child.returncode or line is None:
        sys.exit(f"export failed:\n{child.stdout[-2000:]}\n{child.stderr[-4000:]}")
    report = json.loads(line[len("CHILD "):])
    model_bytes = report["bytes"]
    result = {
        "model_bytes": model_bytes, "params": model_bytes // 4, "shards": report["shards"],
        "export_seconds": round(report["seconds"], 2), "process_wall_seconds": round(wall, 2),
        "peak_rss_bytes": report["peak_rss_bytes"], "import_only_rss_bytes": import_rss,
        "peak_rss_over_model_bytes": round(report["peak_rss_bytes"] / model_bytes, 3),
        "extra_rss_over_model_bytes": round((report["peak_rss_bytes"] - import_rss) / model_bytes, 3),
        "write_MBps": round(model_bytes / 1e6 / report["seconds"], 1),
    }
    print(f"export of {model_bytes / 1e9:.2f} GB ({result['params'] / 1e9:.2f}B fp32 params): "
          f"{result['export_seconds']}s, peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB "
          f"= {result['peak_rss_over_model_bytes']}x the model "
          f"({(result['peak_rss_bytes'] - import_rss) / 1e9:.2f} GB above the "
          f"{import_rss / 1e9:.2f} GB of imports), {result['write_MBps']} MB/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
