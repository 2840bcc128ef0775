"""Global-sample-indexed batches over a map-style dataset.

The trainer addresses data by consumed-sample count, so a resumed run (at any DP size) reads exactly
the samples the uninterrupted run would have read. A phased source (two-phase data) implements the
same two methods.

The validation split is a `ValidationSource`: `batch` reads the whole validation blend (the
trainer's `valid_loss`), and `sources` maps each source's name to a `DatasetSource` over that
source alone (`valid_loss/<name>`); megatron_rlp/data/validation.py builds it.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch


class DatasetSource:
    def __init__(self, dataset, phase_name: Optional[str] = None):
        if len(dataset) == 0:
            raise ValueError(f"the {getattr(dataset, 'split', 'train')} dataset is empty")
        self.dataset = dataset
        self.phase_name = phase_name

    def batch(self, start: int, count: int) -> dict:
        samples = [self.dataset[(start + i) % len(self.dataset)] for i in range(count)]
        return {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
                for key in ("tokens", "labels", "loss_mask")}

    def phase(self, consumed_samples: int) -> Optional[str]:
        return self.phase_name


class ValidationSource(DatasetSource):
    """The validation blend plus one source per prefix of it (see the module docstring)."""

    def __init__(self, blend_dataset, sources: Mapping[str, DatasetSource]):
        super().__init__(blend_dataset)
        self.sources = dict(sources)

    @classmethod
    def of_one_source(cls, name: str, dataset) -> "ValidationSource":
        """A split of one prefix is its own only source: the trainer sees `sources[name] is
        self` and evaluates it once (the two datasets would be the same samples)."""
        split = cls(dataset, {})
        split.sources = {name: split}
        return split
