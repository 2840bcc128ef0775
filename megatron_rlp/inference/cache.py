"""Per-sequence decoding state of the hybrid stack: a KV cache for attention layers and the
(conv, SSM) state for Mamba2 layers.

Shape legend: b sequences, g KV heads (query groups) local to the TP rank, L capacity (tokens),
d head dim; Mamba conv state [b, conv_dim_local, d_conv], SSM state [b, h_local, p, n] (fp32).

Rows are independent: each has its own length (`lengths[b]`), so prefixes of different lengths
share one batch and rows can stop at different points. All edits return new tensors or index rows,
so a prefix state is prefilled once and copied to many continuations with `repeat_rows`.

Packed documents (a prefill with `eod`, as `--reset-attention-mask` trains): `doc_start[b]` is
the first key position of each row's current document (earlier keys are not attended) and
`after_eod[b]` says the row's last token was `<eod>`, so its next token starts a new document
(attention from there on, Mamba states from zero). Without `eod` both are None: one sequence per
row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch


def _rows(t: Optional[torch.Tensor], rows: torch.Tensor) -> Optional[torch.Tensor]:
    return None if t is None else t.index_select(0, rows)


@dataclass
class HybridCache:
    lengths: torch.Tensor                                     # [b] tokens seen per row (int64)
    kv: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # [b,g,L,d]
    mamba: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    eod: Optional[int] = None                                 # packed documents: the <eod> id
    doc_start: Optional[torch.Tensor] = None                  # [b] int64, with eod
    after_eod: Optional[torch.Tensor] = None                  # [b] bool, with eod

    @property
    def batch(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def capacity(self) -> int:
        return min((k.shape[2] for k, _ in self.kv.values()), default=1 << 62)

    def index_rows(self, rows: torch.Tensor) -> "HybridCache":
        """A cache holding rows `rows` (any order, repeats allowed) of this one."""
        return HybridCache(
            lengths=self.lengths.index_select(0, rows),
            kv={i: (k.index_select(0, rows), v.index_select(0, rows)) for i, (k, v) in self.kv.items()},
            mamba={i: (c.index_select(0, rows), s.index_select(0, rows))
                   for i, (c, s) in self.mamba.items()},
            eod=self.eod, doc_start=_rows(self.doc_start, rows),
            after_eod=_rows(self.after_eod, rows))

    def repeat_rows(self, repeats: int) -> "HybridCache":
        """Row r becomes rows r*repeats .. r*repeats+repeats-1 (prefix state copied to G samples)."""
        rows = torch.arange(self.batch, device=self.lengths.device).repeat_interleave(repeats)
        return self.index_rows(rows)

    def grow(self, extra: int) -> "HybridCache":
        """Room for `extra` more tokens in every KV cache (zeros appended along L)."""
        def pad(t):
            return torch.cat([t, t.new_zeros(t.shape[0], t.shape[1], extra, t.shape[3])], dim=2)
        return HybridCache(self.lengths, {i: (pad(k), pad(v)) for i, (k, v) in self.kv.items()},
                           dict(self.mamba), self.eod, self.doc_start, self.after_eod)

    @staticmethod
    def concat(caches: List["HybridCache"]) -> "HybridCache":
        """Stack caches row-wise; KV caches are zero-padded to the largest capacity (padding keys
        are masked by `lengths`)."""
        cap = max(c.capacity for c in caches) if caches[0].kv else 0
        eods = {c.eod for c in caches}
        if len(eods) > 1:
            raise ValueError(f"cannot concatenate caches prefilled with different <eod> settings "
                             f"{sorted(eods, key=str)}: prefill all rows alike")
        out = HybridCache(lengths=torch.cat([c.lengths for c in caches]), eod=caches[0].eod)
        if out.eod is not None:
            out.doc_start = torch.cat([c.doc_start for c in caches])
            out.after_eod = torch.cat([c.after_eod for c in caches])
        for i in caches[0].kv:
            ks, vs = [], []
            for c in caches:
                k, v = c.kv[i]
                extra = cap - k.shape[2]
                if extra:
                    k = torch.cat([k, k.new_zeros(k.shape[0], k.shape[1], extra, k.shape[3])], 2)
                    v = torch.cat([v, v.new_zeros(v.shape[0], v.shape[1], extra, v.shape[3])], 2)
                ks.append(k)
                vs.append(v)
            out.kv[i] = (torch.cat(ks), torch.cat(vs))
        for i in caches[0].mamba:
            out.mamba[i] = (torch.cat([c.mamba[i][0] for c in caches]),
                            torch.cat([c.mamba[i][1] for c in caches]))
        return out
