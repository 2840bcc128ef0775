"""What `--reset-attention-mask`, `--reset-position-ids` and `--eod-mask-loss` (Megatron-LM's
names and meanings) add to a packed micro-batch, derived from its tokens in the forward step.

    reset_attention_mask  packed_seq_params = PackedDocuments(seq_idx): block-diagonal causal
                          attention and Mamba2 conv/SSM state reset after each <eod>
    reset_position_ids    position_ids restart at 0 after each <eod>
    eod_mask_loss         loss_mask = 0 where the input token is <eod>: the prediction made at an
                          <eod> (its target is the next document's first token) is dropped

Document boundaries come from `models/packing.py` only (the <eod> ends its document; the next token
starts one), so attention, Mamba and positions agree, and they equal what megatron-core's
`GPTDataset` builds with the same flags (`_get_ltor_masks_and_position_ids`; a test holds them
equal). Why not let the dataset build them: it makes a [1, s, s] mask per sample on the host
with a Python loop over <eod>s, the data sources batch only tokens, labels and the loss mask,
and the Mamba2 mixers need `seq_idx`, which the dataset does not make. Here everything is one
vectorised pass on the device, and the dataset's index cache does not depend on the flags.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from megatron_rlp.models.packing import document_ids, positions_in_document

_FLAGS = ("reset_attention_mask", "reset_position_ids", "eod_mask_loss")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _tokenizer_eod(tokenizer) -> Optional[int]:
    """The tokenizer's end-of-document id, or None when it has none (ours raise ValueError)."""
    if tokenizer is None:
        return None
    try:
        return getattr(tokenizer, "eod", None)
    except ValueError:
        return None


@dataclass(frozen=True)
class DocumentInputs:
    reset_attention_mask: bool = False
    reset_position_ids: bool = False
    eod_mask_loss: bool = False
    eod: Optional[int] = None

    @classmethod
    def from_config(cls, data_cfg, tokenizer) -> "DocumentInputs":
        """The flags of `data_cfg` (a DataConfig; None: all off) with `tokenizer`'s <eod>;
        ValueError (one line naming the flag and the alternative) when a flag is on and there is
        no <eod>."""
        flags = {name: bool(getattr(data_cfg, name, False)) for name in _FLAGS}
        on = [name for name, value in flags.items() if value]
        if not on:
            return cls()
        eod = _tokenizer_eod(tokenizer)
        if eod is None:
            source = getattr(tokenizer, "source", type(tokenizer).__name__)
            raise ValueError(
                f"{_flag(on[0])}: the tokenizer ({source}) has no end-of-document token, so "
                f"packed documents cannot be told apart; add an <eod> special token to the "
                f"tokenizer (and end documents with it: preprocess with --append-eod), or drop "
                f"{' '.join(_flag(name) for name in on)}")
        return cls(**flags, eod=int(eod))

    def apply(self, tokens: torch.Tensor, loss_mask: torch.Tensor
              ) -> Tuple[Optional[torch.Tensor], Optional[object], torch.Tensor]:
        """tokens [b, s], loss_mask [b, s] -> (position_ids [b, s] or None, packed_seq_params or
        None, loss_mask), on the tokens' device. All flags off: (None, None, loss_mask) unchanged,
        i.e. megatron's defaults (one sequence per window, positions 0..s-1)."""
        position_ids = packed = None
        if self.reset_attention_mask or self.reset_position_ids:
            ids = document_ids(tokens, self.eod)
            if self.reset_attention_mask:
                from megatron_rlp.models.packed import PackedDocuments  # imports megatron-core

                packed = PackedDocuments(seq_idx=ids)
            if self.reset_position_ids:
                position_ids = positions_in_document(ids)
        if self.eod_mask_loss:
            loss_mask = loss_mask * (tokens != self.eod).to(loss_mask.dtype)
        return position_ids, packed, loss_mask
