"""Where the documents of a packed window begin and end.

Pretraining windows hold several documents back to back, each ended by `<eod>`. The `<eod>` token
belongs to the document it ends (it is that document's last token, and predicting it is that
document's job); the token after it starts the next document. This matches Megatron-LM's
`get_ltor_masks_and_position_ids`, whose reset masks cut *after* each `<eod>`.

Both helpers are vectorised over the batch and stay on the tensor's device, so the attention mask,
the Mamba2 `seq_idx`, reset position ids and RLP contexts all come from one definition.
"""
from __future__ import annotations

import torch


def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """tokens [..., s] -> int64 [..., s]: index of the document each token belongs to (0, 1, ...).

    The count of `<eod>` tokens strictly before each position: an `<eod>` keeps its document's id.
    """
    is_eod = (tokens == eod).to(torch.int64)
    return torch.cumsum(is_eod, dim=-1) - is_eod


def positions_in_document(doc_ids: torch.Tensor) -> torch.Tensor:
    """document ids [..., s] -> int64 [..., s]: offset of each token from its document's first token."""
    seq_len = doc_ids.shape[-1]
    index = torch.arange(seq_len, device=doc_ids.device).expand_as(doc_ids)
    starts_here = torch.ones_like(doc_ids, dtype=torch.bool)
    starts_here[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    first_token = torch.where(starts_here, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - first_token
