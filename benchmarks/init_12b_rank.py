"""Weight-init time of one 12B TP=8 rank on CPU: the previous path vs the current one.

    python benchmarks/init_12b_rank.py [--config examples/nemotron_h_12b.yaml] [--rank 7]
                                       [--layers N] [--repeats R]

Previous path: megatron drew every full weight on CPU (`perform_initialization=True`), then
`layout_invariant_init` and the Mamba2 mixer redrew each matrix in full from its (seed, global
name) stream and kept the rank's slice: two full draws per matrix (one for the mixer's in/out
projections, plus megatron's full-size allocation and copy). Current path: megatron draws nothing;
each matrix is drawn once, and only the rank's elements of it: the other ranks' parts of the
stream are skipped as 32-bit integers, row by row for a dim-1 split (`mamba2_layout.draw_slice`).
Both give the same weights (tests/test_init.py).

One process stands in for the rank: a "fake" process group of TP ranks (as `--dry-run` does) lets
megatron's parallel_state build real groups while `--rank` says which TP rank is built. The rank
matters for the current path: every rank advances through the streams up to its last element, so
the last rank (default) skips the most and is the slowest.

A whole 12B rank (1.5B parameters; the previous path draws ~20B normals for it) is timed as pieces,
each built with both paths: one Mamba2, one attention and one MLP layer without embedding and
output layer, and the embedding + output layer (a one-MLP-layer model with them, minus the
MLP-only build); the whole rank is extrapolated from the pattern's layer counts. `--layers N` also
builds the first N layers with embedding and output to check the extrapolation (N = 62: the whole
rank, ~7.5 GB peak RSS, ~6 minutes on 2 CPU cores). Prints wall and CPU seconds per piece and
path (CPU time is steadier
on a shared machine), their ratio, the floor of the current path (this rank's normals plus the
skipped rest of each stream at the measured generator rates; exact for the last rank), peak RSS
per build (VmHWM, reset before each), and one JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from hf_export import peak_rss_bytes  # noqa: E402  (this script's folder is on sys.path)

KIND_SYMBOLS = {"mamba": "M", "attention": "*", "mlp": "-"}


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def previous_path(enabled: bool):
    """The init as it was: megatron draws too, and our init draws full tensors then slices."""
    from megatron_rlp.models import hybrid, mamba2_layout

    if not enabled:
        yield
        return
    real, real_rows = hybrid.transformer_config, mamba2_layout.PARTIAL_DRAWS

    def megatron_draws_too(cfg, **kwargs):
        config = real(cfg, **kwargs)
        config.perform_initialization = True
        return config

    hybrid.transformer_config, mamba2_layout.PARTIAL_DRAWS = megatron_draws_too, False
    try:
        yield
    finally:
        hybrid.transformer_config, mamba2_layout.PARTIAL_DRAWS = real, real_rows


def timed_build(values: dict, vocab: int, pattern: str, with_ends: bool, previous: bool,
                repeats: int) -> dict:
    """Build the layers `pattern` (with embedding and output layer when `with_ends`): wall and
    CPU seconds (best of `repeats`), this rank's parameter count, the normals its matrices hold
    and those of their full (TP=1) tensors, and the peak RSS of the build."""
    import torch

    from megatron_rlp.config import config_from_dict
    from megatron_rlp.models.hybrid import build_model

    cfg = config_from_dict(dict(values, num_layers=len(pattern), hybrid_override_pattern=pattern))
    tp = cfg.parallel.tensor_model_parallel_size
    best = None
    for _ in range(repeats):
        gc.collect()
        _reset_peak_rss()
        torch.manual_seed(1234)
        wall, cpu = time.perf_counter(), time.process_time()
        with previous_path(previous):
            model = build_model(cfg, vocab, pre_process=with_ends, post_process=with_ends)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        peak = peak_rss_bytes()
        # matrices drawn from normal streams (conv1d weights are 3-D uniforms, norms ones)
        local = sum(p.numel() for p in model.parameters() if p.dim() == 2)
        full = sum(p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1)
                   for p in model.parameters() if p.dim() == 2)
        params = sum(p.numel() for p in model.parameters())
        del model
        if best is None or wall < best["s"]:
            best = {"s": wall, "cpu_s": cpu, "params": params, "local_normals": local,
                    "full_normals": full, "peak_rss": peak}
    gc.collect()
    return best


def stream_rates(elements: int = 1 << 24) -> tuple:
    """(fp32 normals, skipped 32-bit draws) per CPU second of torch's CPU generator, best of 3
    on a warm buffer (both are single-threaded)."""
    import torch

    normal, skip = torch.empty(elements), torch.empty(elements, dtype=torch.uint8)
    rates = []
    for fill in (normal.normal_, skip.random_):
        fill()  # fault the pages in
        best = min(_timed(fill) for _ in range(3))
        rates.append(elements / best)
    return tuple(rates)


def _timed(fn) -> float:
    start = time.process_time()  # CPU seconds: steadier than wall time on a shared machine
    fn()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(REPO, "examples", "nemotron_h_12b.yaml"))
    parser.add_argument("--rank", type=int, default=None, help="TP rank to build (default last)")
    parser.add_argument("--layers", type=int, default=None,
                        help="also build this prefix of the pattern with embedding and output "
                             "(0 = skip; default: 4; the whole rank needs ~10 GB and minutes)")
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary (default the config's dry_run_vocab_size)")
    parser.add_argument("--repeats", type=int, default=1, help="builds per piece and path (best)")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import megatron_rlp.dry_run  # noqa: F401  (registers the dry_run_* keys of the YAML)
    from megatron_rlp.config import config_from_dict, load_yaml
    from megatron_rlp.training.distributed import prepare_megatron

    values = load_yaml(args.config)
    cfg = config_from_dict(values)
    tp = cfg.parallel.tensor_model_parallel_size
    rank = tp - 1 if args.rank is None else args.rank
    if not 0 <= rank < tp:
        raise ValueError(f"--rank {rank}: must be a TP rank of 0..{tp - 1}")
    vocab = args.vocab or cfg.dry_run_plan.dry_run_vocab_size or 131072
    pattern = cfg.model.hybrid_override_pattern
    layers = 4 if args.layers is None else min(args.layers, len(pattern))
    values = dict(values, pipeline_model_parallel_size=1)

    prepare_megatron()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=tp)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=1,
                                             create_gloo_process_groups=False)
    normal_rate, skip_rate = stream_rates()
    dtype = "bf16" if cfg.training.bf16 else "fp32"
    print(f"init_12b_rank: {os.path.basename(args.config)} TP={tp} rank {rank}, vocab {vocab}, "
          f"{dtype} params, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"CPU generator: {normal_rate / 1e6:.0f} M normals/s, {skip_rate / 1e6:.0f} M skipped "
          f"draws/s", flush=True)

    timed_build(values, 512, "-", False, False, 1)  # warm-up: imports, first allocations
    pieces = {f"{kind} layer": (sym, False) for kind, sym in KIND_SYMBOLS.items()}
    pieces["mlp layer + embedding + output"] = ("-", True)
    if layers:
        pieces[f"first {layers} layers + embedding + output"] = (pattern[:layers], True)
    rows = {}
    print(f"{'piece':<38} {'params/rank':>12} {'previous s':>14} {'current s':>14} "
          f"{'ratio':>6} {'floor s':>7} {'peak RSS GB':>12}")
    print(f"{'':<38} {'':>12} {'wall (cpu)':>14} {'wall (cpu)':>14} {'wall':>6} {'cpu':>7} "
          f"{'prev / cur':>12}")
    for name, (pat, ends) in pieces.items():
        old = timed_build(values, vocab, pat, ends, True, args.repeats)
        new = timed_build(values, vocab, pat, ends, False, args.repeats)
        # The floor of the current path: draw this rank's normals, skip the rest of each stream
        # (exact for the last TP rank; lower ranks stop a dim-0 stream after their rows).
        floor = (new["local_normals"] / normal_rate
                 + (new["full_normals"] - new["local_normals"]) / skip_rate)
        rows[name] = {"pattern": pat, "with_embedding_and_output": ends,
                      "params_per_rank": new["params"], "previous_s": old["s"],
                      "current_s": new["s"], "previous_cpu_s": old["cpu_s"],
                      "current_cpu_s": new["cpu_s"], "ratio": old["s"] / new["s"],
                      "cpu_ratio": old["cpu_s"] / new["cpu_s"], "floor_s": floor,
                      "previous_peak_rss": old["peak_rss"], "current_peak_rss": new["peak_rss"]}
        print(f"{name:<38} {new['params']:>12,} {old['s']:>6.2f} ({old['cpu_s']:>5.2f}) "
              f"{new['s']:>6.2f} ({new['cpu_s']:>5.2f}) {old['s'] / new['s']:>5.2f}x "
              f"{floor:>7.2f} {old['peak_rss'] / 1e9:>5.2f} / {new['peak_rss'] / 1e9:.2f}",
              flush=True)

    # Extrapolate the whole rank: embedding + output, plus each layer kind times its count.
    keys = ("previous_s", "current_s", "previous_cpu_s", "current_cpu_s", "floor_s",
            "params_per_rank")
    ends = {k: rows["mlp layer + embedding + output"][k] - rows["mlp layer"][k] for k in keys}
    counts = {kind: pattern.count(sym) for kind, sym in KIND_SYMBOLS.items()}
    full = {k: ends[k] + sum(counts[kind] * rows[f"{kind} layer"][k] for kind in KIND_SYMBOLS)
            for k in ends}
    print(f"whole rank, extrapolated ({len(pattern)} layers: {counts['mamba']} M, "
          f"{counts['attention']} *, {counts['mlp']} -; {full['params_per_rank'] / 1e9:.2f}B "
          f"params): previous {full['previous_s']:.1f} s ({full['previous_cpu_s']:.1f} s CPU), "
          f"current {full['current_s']:.1f} s ({full['current_cpu_s']:.1f} s CPU), ratio "
          f"{full['previous_s'] / full['current_s']:.2f}x wall, "
          f"{full['previous_cpu_s'] / full['current_cpu_s']:.2f}x CPU; floor of the current "
          f"path {full['floor_s']:.1f} s CPU")
    check = None
    if layers:
        prefix = rows[f"first {layers} layers + embedding + output"]
        kinds = {kind: pattern[:layers].count(sym) for kind, sym in KIND_SYMBOLS.items()}
        predicted = {k: ends[k] + sum(kinds[kind] * rows[f"{kind} layer"][k]
                                      for kind in KIND_SYMBOLS) for k in ("previous_s", "current_s")}
        check = {k: prefix[k] / predicted[k] for k in predicted}
        print(f"check: the {layers}-layer build took {check['previous_s']:.2f}x (previous) and "
              f"{check['current_s']:.2f}x (current) of what the pieces predict")
    peak = max(max(r["previous_peak_rss"], r["current_peak_rss"]) for r in rows.values())
    print(f"peak RSS of any build: {peak / 1e9:.2f} GB")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    print(json.dumps({
        "benchmark": "init_12b_rank", "config": os.path.basename(args.config), "tp": tp,
        "rank": rank, "vocab": vocab, "dtype": dtype, "threads": torch.get_num_threads(),
        "normal_per_s": normal_rate, "skip_per_s": skip_rate, "pieces": rows,
        "extrapolated_rank": full,
        "extrapolated_ratio": full["previous_s"] / full["current_s"],
        "extrapolated_cpu_ratio": full["previous_cpu_s"] / full["current_cpu_s"],
        "prefix_over_prediction": check, "peak_rss_bytes": peak}))


if __name__ == "__main__":
    main()
