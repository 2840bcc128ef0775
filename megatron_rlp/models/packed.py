"""Packed documents as the model sees them: `PackedDocuments`, handed to megatron's
`MambaModel.forward(..., packed_seq_params=PackedDocuments.from_tokens(tokens, eod))`.

Pretraining windows hold several documents back to back. With `--reset-attention-mask` no
document may see another: attention is block-diagonal causal and every Mamba2 mixer resets its
conv and SSM state where a new document starts. Both read the same per-token document ids,
`seq_idx [b, s]` from `models/packing.document_ids` (the token after each `<eod>` starts a new
document), so attention and Mamba can never disagree on a boundary.

Why a `PackedSeqParams`, and why not megatron's own fields. megatron-core 0.16.1's `MambaLayer`
hands its mixer nothing but `packed_seq_params` (the attention mask stops at the layer), so that
argument is the one road from `MambaModel.forward` to every mixer and every core attention
without replacing megatron's model, stack or layers. Its own fields describe the THD format:
one stream of documents end to end (batch 1), `cu_seqlens` over that stream (megatron's
`MambaMixer._create_packed_seq_idx` turns them into `seq_idx [1, total]`), and `SelfAttention`
squeezes the batch dimension for `qkv_format="thd"`. Our micro-batches are `[s, b]` windows whose
rows end documents at different places, which one `cu_seqlens` cannot express without
flattening the batch (and re-shaping everything TP/SP/PP pass around). So this subclass keeps
`qkv_format="sbhd"` (megatron's THD branches stay off) and carries the per-row `seq_idx` itself.
Consumers: `mamba2.Mamba2Mixer` (`document_seq_idx`) and `attention.SDPACoreAttention`
(`attention_mask`). A core attention declares that it understands this object with the class
attribute `accepts_packed_documents = True`; `refuse_attention_without_block_mask` checks a built
model before any work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_rlp.models.packing import document_ids, positions_in_document

_FLAG = "--reset-attention-mask"


@dataclass
class PackedDocuments(PackedSeqParams):
    """Document ids of a packed micro-batch: ``seq_idx [b, s]`` (int64, non-decreasing per row,
    the whole sequence even under sequence parallelism)."""

    qkv_format: str = "sbhd"
    seq_idx: Optional[torch.Tensor] = None
    _mask: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, eod: int) -> "PackedDocuments":
        """tokens [b, s] -> documents cut after each ``eod`` (on the tokens' device)."""
        return cls(seq_idx=document_ids(tokens, eod))

    def attention_mask(self) -> torch.Tensor:
        """[b, 1, s, s] bool, True where query i may attend key j (SDPA's convention): same
        document and j <= i. Built once per forward and shared by every attention layer."""
        if self._mask is None:
            ids = self.seq_idx
            s = ids.shape[-1]
            causal = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril()
            self._mask = ((ids[:, :, None] == ids[:, None, :]) & causal)[:, None]
        return self._mask

    def last_document_start(self) -> torch.Tensor:
        """[b] int64: the position where each row's last document starts (a decoder continuing
        the row attends from there on)."""
        s = self.seq_idx.shape[-1]
        return (s - 1) - positions_in_document(self.seq_idx)[:, -1]


def refuse_attention_without_block_mask(model: torch.nn.Module) -> None:
    """ValueError (one line naming the flag and the alternative) unless every core attention of
    `model` can take the block-diagonal document mask.

    Two ways a fast path cannot: a core attention that does not know `PackedDocuments` (TE's or
    megatron's DotProductAttention would assert or ignore it), and, on a CUDA host, torch SDPA
    restricted to flash attention (`torch.backends.cuda.enable_mem_efficient_sdp(False)` and
    `enable_math_sdp(False)`): flash kernels take no mask, so a masked call would fail mid-run."""
    from megatron.core.transformer.attention import Attention

    for module in model.modules():
        if not isinstance(module, Attention):
            continue
        core = module.core_attention
        if not getattr(type(core), "accepts_packed_documents", False):
            raise ValueError(
                f"{_FLAG}: core attention {type(core).__name__} cannot take a block-diagonal "
                f"document mask; use the default spec's SDPACoreAttention "
                f"(megatron_rlp.models.attention) or drop {_FLAG}")
        if torch.cuda.is_available() and not (torch.backends.cuda.mem_efficient_sdp_enabled()
                                              or torch.backends.cuda.math_sdp_enabled()):
            raise ValueError(
                f"{_FLAG}: torch SDPA is restricted to flash attention, which takes no mask; "
                f"enable the memory-efficient backend "
                f"(torch.backends.cuda.enable_mem_efficient_sdp(True)) or drop {_FLAG}")
