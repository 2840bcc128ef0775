"""What a training run reads, decided from its config: the data paths (the embedded corpus when
--data-path is not given), where dataset index caches go, the global batch at this run's
data-parallel size, and the default training source (one megatron-core blend).

The validation split is built by validation.py and a --data-phases schedule by phases.py, from the
same helpers.
"""
from __future__ import annotations

import os
from typing import Optional

from megatron_rlp.data.sources import DatasetSource


def resolve_data(cfg) -> tuple[list, Optional[list]]:
    """(training data path, validation data path or None); the embedded corpus and its held-out
    split when --data-path is not given."""
    from megatron_rlp.data.embedded import embedded_paths, ensure_embedded_dataset

    if cfg.data.data_path:
        return list(cfg.data.data_path), list(cfg.data.valid_data_path) or None
    out_dir = cfg.data.embedded_data_dir or os.path.join(
        os.path.expanduser("~"), ".cache", "megatron_rlp", "embedded")
    # Safe on every rank at once: generation holds a file lock and renames into place.
    train_prefix = ensure_embedded_dataset(out_dir)
    return [train_prefix], [embedded_paths(out_dir).valid_prefix]


def data_cache_dir(cfg) -> Optional[str]:
    """Where dataset index caches go: --data-cache-path, else <save>/cache."""
    return cfg.data.data_cache_path or (os.path.join(cfg.checkpoint.save, "cache")
                                        if cfg.checkpoint.save else None)


def run_global_batch_size(cfg) -> int:
    """Sequences per optimizer step at this process's data-parallel size."""
    from megatron.core import parallel_state

    return cfg.training.global_batch(parallel_state.get_data_parallel_world_size())


def build_train_source(cfg, tokenizer, data_path: list) -> DatasetSource:
    """The training source of a run without --data-phases: --train-iters global batches of the
    blend `data_path`. Called on every rank: megatron's builder indexes on rank 0 first and then
    the others read."""
    from megatron_rlp.data.datasets import build_pretraining_dataset

    dataset = build_pretraining_dataset(
        data_path, seq_length=cfg.training.seq_length,
        num_samples=cfg.training.train_iters * run_global_batch_size(cfg),
        seed=cfg.training.seed, tokenizer=tokenizer, split="train",
        cache_dir=data_cache_dir(cfg))
    return DatasetSource(dataset)
