"""The validation split, per source: `valid_loss` on the whole blend, `valid_loss/<name>` on each
source of it (metrics.jsonl, the progress line, tensorboard).

Where the split comes from (the first that applies):
  1. --data-phases whose `sources` table gives `valid_path` entries (megatron_rlp/data/phases.py):
     one source per entry, named as the table names it (the names the phases' sources have); the
     blend is all of them, weighted by size (megatron-core's rule for a list of prefixes).
     Giving --valid-data-path as well is refused: the split would be ambiguous.
  2. --valid-data-path, else the embedded held-out split: one source per distinct prefix, named by
     `blend.source_names` (`data/web_text_document` -> `web`; clashing names keep the file name,
     then parent folders). Weights in --valid-data-path weigh the blend only.

Cost: one evaluation runs --eval-iters micro-batches (per data-parallel rank) on the blend and as
many again on each source, (1 + S) x --eval-iters forward passes for S sources; a split of one
prefix is evaluated once. Lower --eval-iters (or --eval-interval) to spend less.

Determinism: every split is a megatron-core dataset of --eval-iters global batches drawn with
--seed, and every evaluation reads it from sample 0, so the numbers depend only on the weights: a
resumed run reports what the uninterrupted run reports at the same iteration.
"""
from __future__ import annotations

import os
from typing import Optional

from megatron_rlp.data import blend as blend_lib
from megatron_rlp.data.datasets import parse_data_path
from megatron_rlp.data.phases import load_valid_sources
from megatron_rlp.data.sources import DatasetSource, ValidationSource
from megatron_rlp.device import is_rank_zero


def validation_split(cfg, valid_path: list) -> tuple[list, list]:
    """(data_path of the blend, [(name, prefix, phases training on it)]) for this run."""
    declared = load_valid_sources(cfg.phases.data_phases) if cfg.phases.data_phases else []
    if declared:
        if cfg.data.valid_data_path:
            raise ValueError(
                f"--valid-data-path and the valid_path entries of --data-phases "
                f"{cfg.phases.data_phases!r} both give the validation split; drop one")
        return [v.prefix for v in declared], [(v.name, v.prefix, v.phases) for v in declared]
    prefixes = list(dict.fromkeys(os.path.normpath(os.path.abspath(p))
                                  for p in parse_data_path(valid_path)[0]))
    names = blend_lib.source_names(prefixes)
    return list(valid_path), [(name, prefix, ()) for name, prefix in zip(names, prefixes)]


def build_validation_source(blend_path: list, sources: list, build) -> ValidationSource:
    """`build(data_path, what)` makes one dataset; `what` names it in errors."""
    if len(sources) == 1 and len(parse_data_path(blend_path)[0]) == 1:
        name = sources[0][0]
        dataset = build(blend_path, f"validation source {name!r}")
        return ValidationSource.of_one_source(name, dataset)
    blended = build(blend_path, "validation blend")
    return ValidationSource(blended, {
        name: DatasetSource(build([prefix], f"validation source {name!r}"))
        for name, prefix, _ in sources})


def describe(sources: list, eval_iters: int) -> str:
    """Start-up lines: each source's metric key, prefix and the phases that train on it."""
    if len(sources) == 1:
        head = f"validation: 1 source, {eval_iters} micro-batches per evaluation"
    else:
        head = (f"validation: blend of {len(sources)} sources; each evaluation runs {eval_iters} "
                f"micro-batches on the blend and {eval_iters} on each source")
    width = max(len(name) for name, _, _ in sources) + len("valid_loss/")
    lines = [head]
    for name, prefix, phases in sources:
        trained = f"  (trained in {', '.join(phases)})" if phases else ""
        lines.append(f"  {'valid_loss/' + name:<{width}} <- {prefix}{trained}")
    return "\n".join(lines)


def validation_source(cfg, tokenizer, valid_path: Optional[list]) -> Optional[ValidationSource]:
    """The validation split of a run (see the module docstring) from `valid_path`, the run's
    validation data path (`run_data.resolve_data`), or None when it has none (--data-path
    without --valid-data-path). Called on every rank (megatron's dataset builder indexes on
    rank 0 first)."""
    from megatron_rlp.data.datasets import build_pretraining_dataset
    from megatron_rlp.data.run_data import data_cache_dir, run_global_batch_size

    if not valid_path:
        return None
    blend_path, sources = validation_split(cfg, valid_path)
    # --eval-iters global batches.
    num_samples = cfg.training.eval_iters * run_global_batch_size(cfg)

    def build(data_path: list, what: str):
        try:
            return build_pretraining_dataset(
                data_path, seq_length=cfg.training.seq_length, num_samples=num_samples,
                seed=cfg.training.seed, tokenizer=tokenizer, split="valid",
                cache_dir=data_cache_dir(cfg))
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"{what}: {e}") from None

    split_source = build_validation_source(blend_path, sources, build)
    if is_rank_zero():
        print(describe(sources, cfg.training.eval_iters), flush=True)
    return split_source
