"""Global-sample-indexed batches over a map-style dataset.

The trainer addresses data by consumed-sample count, so a resumed run (at any DP size) reads exactly
the samples the uninterrupted run would have read. A phased source (two-phase data) implements the
same two methods.
"""
from __future__ import annotations

from typing import Optional

import torch


class DatasetSource:
    def __init__(self, dataset, phase_name: Optional[str] = None):
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        self.dataset = dataset
        self.phase_name = phase_name

    def batch(self, start: int, count: int) -> dict:
        samples = [self.dataset[(start + i) % len(self.dataset)] for i in range(count)]
        return {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
                for key in ("tokens", "labels", "loss_mask")}

    def phase(self, consumed_samples: int) -> Optional[str]:
        return self.phase_name
