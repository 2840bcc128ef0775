"""`--dry-run`: parameter counts and a per-GPU memory estimate for a config and parallel layout,
computed by building every pipeline stage's model on the meta device (nothing is allocated).

    python -m megatron_rlp.train --config examples/nemotron_h_12b.yaml --dry-run

One process stands in for the whole job: a "fake" torch.distributed process group of
`--dry-run-world-size` ranks lets megatron's `parallel_state` build real TP/PP/DP groups, and the
model of each pipeline stage is built as that stage's first rank sees it (all TP ranks of a stage
hold the same shapes). Counts are exact; memory is an estimate, explained in `memory_estimate`.
"""
from __future__ import annotations

from megatron_rlp.config import RunConfig

GIB = 1024 ** 3


def _stage_params(model) -> dict:
    """Per-rank and unique (TP-unsharded) parameter counts of one stage's model."""
    per_rank = unique = 0
    for param in model.parameters():
        per_rank += param.numel()
        tp = getattr(param, "tensor_model_parallel", False)
        unique += param.numel() * (_tp_size() if tp else 1)
    return {"per_rank": per_rank, "unique": unique}


def _tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def activation_bytes_per_microbatch(cfg: RunConfig, layer_kinds: list, vocab: int,
                                    first: bool, last: bool) -> float:
    """Activations one micro-batch keeps for backward on one rank of a stage (no recompute).

    Per layer, in elements of `s·b` tokens (Korthikanti et al. 2022 style; fp32 where our code
    computes in fp32): inputs of each norm and of each linear (÷TP for the sharded ones, and the
    hidden-size ones ÷TP too under sequence parallelism); attention Q/K/V, softmax
    probabilities (a/TP · s per token) and context; MLP fc1 output and activation; Mamba in_proj
    output, conv output, scan output, gated-norm output and the per-chunk fp32 SSD states
    (H/TP · P · N per chunk). Plus embedding output (first stage) and fp32 logits (last stage).
    """
    m, p, t = cfg.model, cfg.parallel, cfg.training
    tp = p.tensor_model_parallel_size
    sp = tp if p.sequence_parallel else 1
    e = 2 if t.bf16 else 4
    s, b, h = t.seq_length, t.micro_batch_size, m.hidden_size
    tokens = s * b
    kv = m.kv_channels or h // m.num_attention_heads
    d_inner = m.mamba_num_heads * m.mamba_head_dim
    gn = 2 * m.mamba_num_groups * m.mamba_state_dim
    per_token = {
        "attention": e * (2 * h / sp + (m.num_attention_heads + 2 * m.num_query_groups) * kv / tp
                          + m.num_attention_heads / tp * s + m.num_attention_heads * kv / tp),
        "mlp": e * (2 * h / sp + 2 * m.ffn_hidden_size / tp),
        "mamba": (e * (2 * h / sp + (2 * d_inner + gn + m.mamba_num_heads) / tp
                       + (d_inner + gn) / tp + 3 * d_inner / tp)
                  + 4 * m.mamba_num_heads / tp * m.mamba_head_dim * m.mamba_state_dim
                  / m.mamba_chunk_size),
    }
    total = sum(per_token[kind] for kind in layer_kinds) * tokens
    if first:
        total += e * tokens * h / sp
    if last:
        total += e * tokens * h / sp + 4 * tokens * vocab / tp
    return total


def memory_estimate(cfg: RunConfig, params_per_rank: int, activations: float,
                    in_flight: int, dp: int) -> dict:
    """Bytes per GPU. Weights in the param dtype; gradients in megatron DDP's fp32 grad buffer
    (`grad_reduce_in_fp32`); Adam: fp32 exp_avg + exp_avg_sq, plus an fp32 master copy for bf16,
    all ÷DP with the distributed optimizer; activations × micro-batches in flight (1F1B: stage i
    of P holds up to P − i)."""
    bf16 = cfg.training.bf16
    optimizer_bytes = (12 if bf16 else 8) * params_per_rank
    if cfg.parallel.use_distributed_optimizer:
        optimizer_bytes /= dp
    out = {
        "weights": (2 if bf16 else 4) * params_per_rank,
        "grads": 4 * params_per_rank,
        "optimizer": optimizer_bytes,
        "activations": activations * in_flight,
    }
    out["total"] = sum(out.values())
    return out


def dry_run(cfg: RunConfig, verbose: bool = True) -> dict:
    """Build every pipeline stage on the meta device; print and return counts and memory."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_rlp.data.tokenizer import build_tokenizer
    from megatron_rlp.models.hybrid import build_model, padded_vocab_size
    from megatron_rlp.training.distributed import check_layout, prepare_megatron

    p, t = cfg.parallel, cfg.training
    check_layout(p)
    if dist.is_initialized():
        raise ValueError("--dry-run plans a whole job from one process; run it without torchrun")
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    ext = cfg.dry_run_plan
    world = ext.dry_run_world_size or tp * pp
    if world % (tp * pp):
        raise ValueError(f"--dry-run-world-size={world} is not divisible by TP x PP = {tp} x {pp}; "
                         "plan for a multiple of TP x PP GPUs")
    dp = world // (tp * pp)
    vocab = ext.dry_run_vocab_size or build_tokenizer(cfg.data.tokenizer_type,
                                                      cfg.data.tokenizer_model).vocab_size
    gbs = t.global_batch(dp)
    num_microbatches = gbs // (t.micro_batch_size * dp)
    prepare_megatron()  # as training would on this host; everything is built on the meta device
    padded = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, tp)
    kinds = cfg.model.layer_kinds
    per_stage_layers = len(kinds) // pp

    stages = []
    for stage in range(pp):
        # Rank order tp-dp-pp (megatron's default): the first rank of stage i is i * TP * DP.
        dist.init_process_group("fake", store=FakeStore(), rank=stage * tp * dp, world_size=world)
        try:
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                create_gloo_process_groups=False)
            with torch.device("meta"):
                model = build_model(cfg, vocab,
                                    pre_process=parallel_state.is_pipeline_first_stage(),
                                    post_process=parallel_state.is_pipeline_last_stage())
            counts = _stage_params(model)
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
        layer_kinds = kinds[stage * per_stage_layers:(stage + 1) * per_stage_layers]
        activations = activation_bytes_per_microbatch(cfg, layer_kinds, padded, stage == 0,
                                                      stage == pp - 1)
        in_flight = min(pp - stage, num_microbatches)
        memory = memory_estimate(cfg, counts["per_rank"], activations, in_flight, dp)
        stages.append({"stage": stage, "params_per_rank": counts["per_rank"],
                       "params_unique": counts["unique"], "layers": len(layer_kinds),
                       "microbatches_in_flight": in_flight, "memory_bytes": memory})

    report = {
        "total_params": sum(s["params_unique"] for s in stages),
        "padded_vocab_size": padded,
        "layout": {"tp": tp, "pp": pp, "dp": dp, "world_size": world,
                   "sequence_parallel": p.sequence_parallel,
                   "distributed_optimizer": p.use_distributed_optimizer,
                   "micro_batch_size": t.micro_batch_size, "global_batch_size": gbs,
                   "num_microbatches": num_microbatches},
        "stages": stages,
        "max_memory_bytes": max(s["memory_bytes"]["total"] for s in stages),
    }
    if verbose:
        _print_report(report)
    return report


def _print_report(report: dict) -> None:
    lay = report["layout"]
    print(f"dry run: TP={lay['tp']} PP={lay['pp']} DP={lay['dp']} ({lay['world_size']} GPUs), "
          f"SP={'on' if lay['sequence_parallel'] else 'off'}, distributed optimizer "
          f"{'on' if lay['distributed_optimizer'] else 'off'}, micro-batch "
          f"{lay['micro_batch_size']}, {lay['num_microbatches']} micro-batches per step")
    print(f"parameters: {report['total_params']:,} total ({report['total_params'] / 1e9:.2f}B), "
          f"padded vocab {report['padded_vocab_size']}")
    for s in report["stages"]:
        mem = s["memory_bytes"]
        parts = ", ".join(f"{k} {mem[k] / GIB:.2f}" for k in ("weights", "grads", "optimizer",
                                                              "activations"))
        print(f"  stage {s['stage']}: {s['layers']} layers, {s['params_per_rank']:,} params per "
              f"rank; memory per GPU ~{mem['total'] / GIB:.2f} GiB ({parts} GiB; "
              f"{s['microbatches_in_flight']} micro-batches in flight)")
    print(f"peak memory per GPU ~{report['max_memory_bytes'] / GIB:.2f} GiB "
          "(estimate: no recompute, excludes allocator fragmentation and comm buffers)",
          flush=True)


__all__ = ["dry_run", "activation_bytes_per_microbatch", "memory_estimate"]
