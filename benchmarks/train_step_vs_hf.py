"""Training-step time of our hybrid model vs transformers' NemotronHForCausalLM, same shape and batch.

    python benchmarks/train_step_vs_hf.py [--steps 10] [--warmup 3] [--threads 1] [--profile]

Shape: examples/tiny_cpu.yaml (6 blocks M*M-M-, hidden 160, Mamba 8x40 heads, 2 groups, state 32,
chunk 64, vocab 1024, seq 128, micro-batch 8): 1,349,032 parameters on each side (both printed).
HF's model is built from the config our exporter writes (`hf.mapping.hf_config`) and receives a copy
of our initial weights (`hf.mapping.model_units`), with HF's run-time dt clamp removed as in
`hf.parity`, so both compute the same function; the first loss of each is printed as a check.

A step on each side is forward + loss + backward + optimizer step + zero_grad, fp32:
  ours  the megatron `MambaModel` from `models.hybrid.build_model` in a world of one, called the
        way the trainer's `PretrainStage.forward_step` calls it (`model(tokens, None, None,
        labels=...)`, megatron's fused cross-entropy, mean over tokens);
  HF    `NemotronHForCausalLM(input_ids).logits` then `F.cross_entropy` over the same labels
        (HF's CPU path: its pure-torch conv and chunked scan, as ours).
Both use a plain `torch.optim.AdamW` (same hyper-parameters), not megatron's DDP wrapper and
optimizer, so the comparison is about the models' compute, not optimizer bookkeeping.
The megatron CPU shims (`compat.apply_cpu_patches`, incl. a process-wide TorchFunctionMode) are
active for both sides, as in any CPU training process.

Steps alternate (ours, HF, ours, HF, ...) after a warm-up so load on a shared machine hits both
alike; medians of wall time are compared (the headline ratio), and of this process's CPU time
per step (`time.process_time`, which leaves out time other processes held the core: the steadier
ratio on a busy machine). Each side's achieved GFLOP/s (6 x params x tokens / step time) is
printed with its share of this machine's measured fp32 GEMM rate on the same threads (the
ceiling; a model this small, with its batched small matmuls and elementwise passes, stays well
below it).
`--profile` also prints each side's top ops by self CPU time (torch.profiler, a few steps).
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


def build_ours(cfg):
    from megatron_rlp.data.tokenizer import build_tokenizer
    from megatron_rlp.models.hybrid import build_model
    from megatron_rlp.training.distributed import init_distributed

    init_distributed(cfg.parallel, cfg.training.seed)  # a world of one (gloo), megatron's groups
    model = build_model(cfg, build_tokenizer().vocab_size)
    model.train()
    return model, model.output_layer.weight.shape[0]  # rows = padded vocab


def build_hf(cfg, ours, vocab_rows: int):
    """NemotronHForCausalLM of the same shape holding a copy of `ours`' weights."""
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from megatron_rlp.hf import mapping

    hf_cfg = mapping.hf_config(cfg.model, vocab_size=vocab_rows,
                               max_position_embeddings=cfg.training.seq_length, dtype="float32",
                               eos_token_id=None, pad_token_id=None)
    hf = NemotronHForCausalLM(NemotronHConfig(**hf_cfg))
    for layer in hf.model.layers:  # HF clamps dt at time_step_min at run time, megatron does not
        if hasattr(layer.mixer, "time_step_limit"):
            layer.mixer.time_step_limit = (0.0, float("inf"))

    # Our in-memory state dict holds fused Mamba tensors; the mapping lists them per component
    # (`in_proj.weight.z`, ...), which at TP=1 are consecutive row blocks of the fused tensor.
    ours_sd = ours.state_dict()
    hf_sd = hf.state_dict()
    new = {}
    for unit in mapping.model_units(mapping.dims_from_model_config(cfg.model, vocab_rows)):
        for group in unit:
            tensors = []
            for name, shape in zip(group.ours, group.our_shapes):
                if name in ours_sd:
                    tensors.append(ours_sd[name])
                    continue
                base, _ = name.rsplit(".", 1)
                rows = [s[0] for s in group.our_shapes]
                tensors = list(torch.split(ours_sd[base], rows, dim=0))
                break
            for hf_name, tensor in zip(group.hf, group.to_hf(tensors)):
                key = "model." + hf_name[len("backbone."):] if hf_name.startswith("backbone.") \
                    else hf_name
                new[key] = tensor.detach().clone()
    missing = set(hf_sd) - set(new)
    if missing:
        raise RuntimeError(f"no weights for HF tensors {sorted(missing)[:4]}")
    hf.load_state_dict(new, strict=True)
    hf.train()
    return hf


def make_steps(ours, hf, tokens, labels, lr: float):
    import torch
    import torch.nn.functional as F

    kw = dict(lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt_ours = torch.optim.AdamW(ours.parameters(), **kw)
    opt_hf = torch.optim.AdamW(hf.parameters(), **kw)

    def step_ours():
        per_token = ours(tokens, None, None, labels=labels)  # [b, s], megatron's cross-entropy
        loss = per_token.float().mean()
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss.item()

    def step_hf():
        logits = hf(input_ids=tokens).logits  # [b, s, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
        return loss.item()

    return step_ours, step_hf


def matmul_gflops() -> float:
    """Measured fp32 GEMM throughput (1024^3, best of 5): the practical ceiling here."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best / 1e9


def timed(fn):
    """(wall seconds, CPU seconds of this process, loss). On a shared machine the CPU time leaves
    out the time other processes held the core, so its ratio is the steadier of the two."""
    wall, cpu = time.perf_counter(), time.process_time()
    loss = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, loss


def profile(name: str, fn, steps: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    print(f"\n=== {name}: top ops by self CPU time over {steps} steps ===")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(REPO, "examples", "tiny_cpu.yaml"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true",
                        help="also print each side's top ops (torch.profiler)")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--profile-rows", type=int, default=25)
    args = parser.parse_args()

    import torch

    from megatron_rlp.config import parse_args
    from megatron_rlp.train import _quiet_known_import_warnings

    torch.set_num_threads(args.threads)
    _quiet_known_import_warnings()
    cfg = parse_args(["--config", args.config])
    ours, vocab_rows = build_ours(cfg)
    hf = build_hf(cfg, ours, vocab_rows)
    params_ours = sum(p.numel() for p in ours.parameters())
    params_hf = sum(p.numel() for p in hf.parameters())
    chunk_ours = {m.chunk_size for m in ours.modules() if hasattr(m, "chunk_size")}
    chunk_hf = {m.chunk_size for m in hf.modules() if hasattr(m, "chunk_size")}

    b, s = cfg.training.micro_batch_size, cfg.training.seq_length
    g = torch.Generator().manual_seed(0)
    sample = torch.randint(0, vocab_rows, (b, s + 1), generator=g)
    tokens, labels = sample[:, :-1].contiguous(), sample[:, 1:].contiguous()
    step_ours, step_hf = make_steps(ours, hf, tokens, labels, cfg.optimizer.lr)

    times = {"ours": [], "hf": []}
    cpu_times = {"ours": [], "hf": []}
    first_loss = {}
    for i in range(args.warmup + args.steps):
        for name, fn in (("ours", step_ours), ("hf", step_hf)):
            seconds, cpu_seconds, loss = timed(fn)
            first_loss.setdefault(name, loss)
            if i >= args.warmup:
                times[name].append(seconds)
                cpu_times[name].append(cpu_seconds)
        if i >= args.warmup:
            print(f"step {i - args.warmup:3d}: ours {times['ours'][-1] * 1e3:7.1f} ms   "
                  f"HF {times['hf'][-1] * 1e3:7.1f} ms   "
                  f"ratio {times['ours'][-1] / times['hf'][-1]:.3f}   (CPU time: ours "
                  f"{cpu_times['ours'][-1] * 1e3:6.1f} ms, HF {cpu_times['hf'][-1] * 1e3:6.1f} ms)",
                  flush=True)
    if args.profile:
        profile("ours", step_ours, args.profile_steps, args.profile_rows)
        profile("HF NemotronH", step_hf, args.profile_steps, args.profile_rows)

    from megatron_rlp.training.distributed import destroy_distributed

    destroy_distributed()
    ceiling = matmul_gflops()
    ours_s, hf_s = statistics.median(times["ours"]), statistics.median(times["hf"])
    ours_cpu, hf_cpu = statistics.median(cpu_times["ours"]), statistics.median(cpu_times["hf"])
    flops = 6 * params_ours * b * s
    result = {
        "benchmark": "train_step_vs_hf", "model": os.path.relpath(args.config, REPO),
        "threads": torch.get_num_threads(), "params_ours": params_ours, "params_hf": params_hf,
        "batch": b, "seq_length": s, "steps": args.steps, "warmup": args.warmup,
        "chunk_size_ours": sorted(chunk_ours), "chunk_size_hf": sorted(chunk_hf),
        "ours_ms_per_step": round(ours_s * 1e3, 2), "hf_ms_per_step": round(hf_s * 1e3, 2),
        "ratio_ours_over_hf": round(ours_s / hf_s, 4),
        "ours_min_ms": round(min(times["ours"]) * 1e3, 2),
        "hf_min_ms": round(min(times["hf"]) * 1e3, 2),
        "ours_cpu_ms_per_step": round(ours_cpu * 1e3, 2), "hf_cpu_ms_per_step": round(hf_cpu * 1e3, 2),
        "cpu_ratio_ours_over_hf": round(ours_cpu / hf_cpu, 4),
        "first_loss_ours": first_loss["ours"], "first_loss_hf": first_loss["hf"],
        "ours_gflops": round(flops / ours_s / 1e9, 2), "hf_gflops": round(flops / hf_s / 1e9, 2),
        "matmul_gflops": round(ceiling, 1),
        "ours_share_of_matmul_ceiling": round(flops / ours_s / 1e9 / ceiling, 3),
        "hf_share_of_matmul_ceiling": round(flops / hf_s / 1e9 / ceiling, 3),
    }
    print(f"\n{params_ours:,} parameters (ours) vs {params_hf:,} (HF); batch {b} x {s} tokens, "
          f"Mamba chunk {sorted(chunk_ours)} vs {sorted(chunk_hf)}, {result['threads']} thread(s);"
          f" first loss ours {first_loss['ours']:.6f} HF {first_loss['hf']:.6f}")
    print(f"ours {result['ours_ms_per_step']} ms/step ({result['ours_gflops']} GFLOP/s), "
          f"HF {result['hf_ms_per_step']} ms/step ({result['hf_gflops']} GFLOP/s): "
          f"ours/HF = {result['ratio_ours_over_hf']:.3f}x (median of {args.steps} steps); "
          f"{result['ours_share_of_matmul_ceiling']:.0%} vs {result['hf_share_of_matmul_ceiling']:.0%}"
          f" of the measured fp32 GEMM rate ({result['matmul_gflops']} GFLOP/s)")
    print(f"process CPU time per step: ours {result['ours_cpu_ms_per_step']} ms, HF "
          f"{result['hf_cpu_ms_per_step']} ms: ours/HF = {result['cpu_ratio_ours_over_hf']:.3f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
