"""Multi-process half of tests/test_packed_isolation.py: run under torchrun with 2 ranks
(`mp_utils.launch(..., module="tests.packed_isolation_worker")`).

The same tiny fp32 hybrid model (all layer kinds, 8 Mamba heads in 4 groups: 2 groups per TP rank)
is built in three layouts: TP=2, TP=2 with sequence parallelism, and PP=2 through megatron's
pipeline schedule and `PretrainStage.forward_step` (the trainer's own batch plumbing, on every
stage). In each, windows holding documents A then B (then C) are run twice, the second time with
A's tokens replaced; rank 0 prints one line `RESULT <json>`: per layout, whether B's logits (this
rank's vocab shard) and per-token losses were bit-identical on every rank with
--reset-attention-mask, and how far they moved without it.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from megatron.core import parallel_state

from megatron_rlp import device
from megatron_rlp.config import config_from_dict
from megatron_rlp.models.hybrid import build_model
from megatron_rlp.models.packed import PackedDocuments
from megatron_rlp.training.distributed import destroy_distributed, init_distributed

VOCAB, EOD, SEQ = 200, 0, 40
SHAPE = dict(num_layers=6, hybrid_override_pattern="M*-M*-", hidden_size=64, ffn_hidden_size=128,
             num_attention_heads=4, num_query_groups=2, mamba_num_heads=8, mamba_head_dim=8,
             mamba_state_dim=16, mamba_num_groups=4, mamba_chunk_size=8, seq_length=SEQ,
             micro_batch_size=2, init_method_std=0.15, seed=11)
# Row 0: A = tokens 0..12 (<eod> at 12), B after it. Row 1: A = 0..7, B = 8..30, C after.
EODS = ((12,), (7, 30))


def windows():
    """(tokens, tokens with A replaced, labels, mask of B and later positions) [2, SEQ]."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, VOCAB, (2, SEQ), generator=g)
    later = torch.zeros(2, SEQ, dtype=torch.bool)
    for row, eods in enumerate(EODS):
        tokens[row, list(eods)] = EOD
        later[row, eods[0] + 1:] = True
    replaced = tokens.clone()
    for row, eods in enumerate(EODS):
        replaced[row, :eods[0]] = torch.randint(1, VOCAB, (eods[0],), generator=g)
    labels = torch.roll(tokens, -1, dims=1)  # B's targets are B's tokens in both runs
    return tokens, replaced, labels, later


def compare(run, tokens, replaced, later) -> dict:
    """run(tokens, isolated) -> (logits or None, per-token loss or None) on this rank."""
    out = {}
    for isolated in (True, False):
        a, b = run(tokens, isolated), run(replaced, isolated)
        key = "on" if isolated else "off"
        for name, x, y in (("logits", a[0], b[0]), ("loss", a[1], b[1])):
            if x is None:
                continue
            out[f"{key}_{name}_equal"] = bool(torch.equal(x[later], y[later]))
            out[f"{key}_{name}_max_diff"] = float((x[later] - y[later]).abs().max())
    return out


def tensor_parallel(sequence_parallel: bool) -> dict:
    cfg = config_from_dict(dict(SHAPE, tensor_model_parallel_size=2,
                                sequence_parallel=sequence_parallel, reset_attention_mask=True))
    init_distributed(cfg.parallel, cfg.training.seed)
    model = build_model(cfg, VOCAB).eval()
    tokens, replaced, labels, later = windows()

    @torch.no_grad()
    def run(t, isolated):
        documents = PackedDocuments.from_tokens(t, EOD) if isolated else None
        logits = model(t, None, None, packed_seq_params=documents)
        loss = model(t, None, None, labels=labels, packed_seq_params=documents)
        return logits, loss

    return compare(run, tokens, replaced, later)


def pipeline_parallel() -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rlp.training.trainer import PretrainStage

    cfg = config_from_dict(dict(SHAPE, pipeline_model_parallel_size=2, reset_attention_mask=True,
                                eod_mask_loss=False))
    init_distributed(cfg.parallel, cfg.training.seed)
    model = build_model(cfg, VOCAB, pre_process=parallel_state.is_pipeline_first_stage(),
                        post_process=parallel_state.is_pipeline_last_stage()).eval()
    tokens, replaced, labels, later = windows()
    last_stage = parallel_state.is_pipeline_last_stage()

    class PerTokenLoss(PretrainStage):
        """The trainer's forward step; the loss function hands back the per-token losses."""

        def forward_step(self, data_iterator, model):
            output, _ = super().forward_step(data_iterator, model)
            return output, lambda per_token: (per_token.sum(), {"loss": per_token.clone()})

    @torch.no_grad()
    def run(t, isolated):
        source = SimpleNamespace(batch=lambda start, count: {
            "tokens": t, "labels": labels, "loss_mask": torch.ones(t.shape)})
        run_cfg = cfg if isolated else config_from_dict(dict(SHAPE, pipeline_model_parallel_size=2))
        stage = PerTokenLoss(run_cfg, source, SimpleNamespace(eod=EOD))
        out = get_forward_backward_func()(
            forward_step_func=stage.forward_step, data_iterator=stage.micro_batches(0, 1),
            model=model, num_microbatches=1, seq_length=SEQ, micro_batch_size=2,
            forward_only=True)
        return None, (out[0]["loss"] if last_stage else None)

    result = compare(run, tokens, replaced, later)
    return result if last_stage else {}


def main() -> None:
    torch.set_num_threads(1)
    results = {}
    for name, job in (("tp2", lambda: tensor_parallel(False)),
                      ("tp2_sp", lambda: tensor_parallel(True)),
                      ("pp2", pipeline_parallel)):
        results[name] = device.all_gather_object(job())
        parallel_state.destroy_model_parallel()  # the next layout sets up its own groups
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(results), flush=True)
    destroy_distributed()


if __name__ == "__main__":
    main()
