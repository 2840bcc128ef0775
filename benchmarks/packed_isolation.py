"""Training-step throughput of packed windows with document isolation on vs off, in one run.

    python benchmarks/packed_isolation.py                      # CPU-sized default (fp32)
    python benchmarks/packed_isolation.py --seq-length 4096 --hidden-size 1024 --bf16   # GPU

One hybrid model (Mamba2, attention, MLP layers), one set of packed windows (documents of random
length, each ended by <eod>), three settings timed in interleaved rounds after a warm-up:

    off        one sequence per window (Megatron's default, SDPA's is_causal fast path)
    on         --reset-attention-mask: block-diagonal mask, Mamba2 conv/SSM reset per document
    on_many    the same with 8x more, 8x shorter documents per window

A step is what the trainer's forward step does per micro-batch — derive the inputs from the
tokens (`DocumentInputs.apply`, on the device), forward to the per-token loss, backward — with a
device sync on each side; each setting's best step of the rounds counts (the least disturbed by
other work on the machine; on a CPU the process CPU time of the step is also shown, which other
processes barely disturb with --threads 1). Printed: tokens/s of each, the ratio on/off (the
price of isolation), the ratio on_many/on (about 1: the cost does not grow with the number of
documents, i.e. nothing loops over documents), and each setting's share of the device's measured
dense matmul throughput (model FLOPs from megatron_rlp.training.flops, 3x forward). Ends with one
JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

VOCAB, EOD = 1024, 0


def packed_windows(batch: int, seq: int, mean_doc: int, seed: int):
    """[batch, seq] random tokens in documents of geometric length (mean `mean_doc`, at least
    2), each ended by <eod>; the last document runs past the window like a real packed sample."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (batch, seq), generator=g)
    ends = torch.rand(batch, seq, generator=g) < 1.0 / mean_doc
    ends[:, 0] = False
    tokens[ends] = EOD
    return tokens


def matmul_flops_per_s(device, dtype) -> float:
    """Measured dense matmul throughput of this device: the practical ceiling."""
    import torch

    n = 2048 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / best_of(lambda: a @ b, device, 5)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn, device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-length", type=int, default=1024)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--doc-length", type=int, default=128, help="mean document length (tokens)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (each times all three)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from megatron_rlp.config import config_from_dict
    from megatron_rlp.data.document_inputs import DocumentInputs
    from megatron_rlp.models.hybrid import build_model
    from megatron_rlp.training.distributed import destroy_distributed, init_distributed
    from megatron_rlp.training.flops import model_flops_per_sequence

    h = args.hidden_size
    cfg = config_from_dict(dict(
        num_layers=6, hybrid_override_pattern="M*-M*-", hidden_size=h, ffn_hidden_size=4 * h,
        num_attention_heads=max(2, h // 64), num_query_groups=max(1, h // 128) if h >= 128 else 1,
        mamba_num_heads=max(2, h // 32), mamba_head_dim=64, mamba_state_dim=64,
        mamba_num_groups=1, mamba_chunk_size=128, seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, bf16=args.bf16, seed=1,
        reset_attention_mask=True))
    init_distributed(cfg.parallel, cfg.training.seed)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    try:
        model = build_model(cfg, VOCAB).to(device)
        b, s = args.micro_batch_size, args.seq_length
        windows = {"few": packed_windows(b, s, args.doc_length, 0).to(device),
                   "many": packed_windows(b, s, max(2, args.doc_length // 8), 1).to(device)}
        settings = {"off": (DocumentInputs(), "few"),
                    "on": (DocumentInputs(reset_attention_mask=True, eod=EOD), "few"),
                    "on_many": (DocumentInputs(reset_attention_mask=True, eod=EOD), "many")}

        def step(name):
            inputs, which = settings[name]
            tokens = windows[which]
            position_ids, documents, loss_mask = inputs.apply(tokens, torch.ones_like(
                tokens, dtype=torch.float32))
            loss = model(tokens, position_ids, None, labels=torch.roll(tokens, -1, 1),
                         packed_seq_params=documents)
            ((loss.float() * loss_mask).sum() / loss_mask.sum()).backward()
            model.zero_grad(set_to_none=True)

        wall = {name: [] for name in settings}
        cpu = {name: [] for name in settings}
        for name in settings:  # warm-up
            step(name)
        for _ in range(args.rounds):
            for name in settings:
                sync(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                step(name)
                sync(device)
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        peak = matmul_flops_per_s(device, dtype)
        step_flops = 3 * b * model_flops_per_sequence(cfg.model, s, model.vocab_size).total
    finally:
        destroy_distributed()

    docs = {which: int((t == EOD).sum()) + b for which, t in windows.items()}
    best = {name: min(ts) for name, ts in wall.items()}
    best_cpu = {name: min(ts) for name, ts in cpu.items()}
    spread = {name: (max(ts) - min(ts)) / min(ts) for name, ts in wall.items()}
    print(f"device={device.type} dtype={str(dtype).split('.')[-1]} threads="
          f"{torch.get_num_threads()} hidden={h} seq={s} micro_batch={b} rounds={args.rounds} "
          f"dense matmul ceiling={peak / 1e9:.1f} GFLOP/s")
    for name, (_, which) in settings.items():
        shown_cpu = f"  cpu {best_cpu[name] * 1e3:8.1f} ms" if device.type == "cpu" else ""
        print(f"  {name:8s} {docs[which]:4d} documents  {b * s / best[name]:9.0f} tokens/s  "
              f"best step {best[name] * 1e3:8.1f} ms (rounds spread {spread[name]:.0%}){shown_cpu}"
              f"  {step_flops / best[name] / peak:.0%} of the matmul ceiling")
    ratio, many = best["off"] / best["on"], best["on"] / best["on_many"]
    line = (f"throughput ratio isolation on/off = {ratio:.3f}; {docs['many']} vs {docs['few']} "
            f"documents per batch (on_many/on) = {many:.3f}")
    if device.type == "cpu":
        line += (f"; by CPU time: on/off = {best_cpu['off'] / best_cpu['on']:.3f}, on_many/on = "
                 f"{best_cpu['on'] / best_cpu['on_many']:.3f}")
    print(line)
    print(json.dumps({
        "benchmark": "packed_isolation", "device": device.type, "dtype": str(dtype),
        "threads": torch.get_num_threads(), "hidden_size": h, "seq_length": s,
        "micro_batch_size": b, "rounds": args.rounds, "documents": docs,
        "best_step_ms": {k: round(v * 1e3, 2) for k, v in best.items()},
        "best_step_cpu_ms": {k: round(v * 1e3, 2) for k, v in best_cpu.items()},
        "spread": {k: round(v, 3) for k, v in spread.items()},
        "tokens_per_s": {k: round(b * s / v, 1) for k, v in best.items()},
        "ratio_on_over_off": round(ratio, 4), "ratio_many_over_few_documents": round(many, 4),
        "matmul_ceiling_flops": peak, "model_flops_per_step": step_flops}))


if __name__ == "__main__":
    main()
