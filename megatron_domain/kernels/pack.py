"""Packing metadata: from a packed row of tokens and the EOD id to per-document structure.

A document ends with (and includes) its EOD token; the next token starts a new document.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackMetadata:
    """Per-token document structure of a packed batch."""

    document_ids: torch.Tensor  # [B, S] int64, 0-based document index within each row
    position_ids: torch.Tensor  # [B, S] int64, position within the document (resets to 0)
    cu_seqlens: torch.Tensor  # [num_docs + 1] int32, cumulative lengths over the flattened batch
    loss_mask: torch.Tensor  # [B, S] bool, False where the label would cross into the next document


def pack_metadata_reference(tokens: torch.Tensor, eod_id: int) -> PackMetadata:
    """tokens [B, S] -> PackMetadata. The prediction made *at* an EOD token (its label is the
    next document's first token) is masked out, so no loss crosses a document boundary."""
    bsz, seq = tokens.shape
    is_eod = tokens == eod_id  # [B, S]
    ends_before = torch.cumsum(is_eod.long(), dim=1) - is_eod.long()  # [B, S] EODs strictly before i
    document_ids = ends_before
    starts = torch.ones_like(is_eod)  # [B, S] True where a document starts
    starts[:, 1:] = is_eod[:, :-1]
    index = torch.arange(seq, device=tokens.device).expand(bsz, seq)  # [B, S]
    start_index = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values  # [B, S]
    position_ids = index - start_index  # [B, S]
    flat_starts = starts.reshape(-1).nonzero().squeeze(-1)  # [num_docs]
    cu_seqlens = torch.cat([flat_starts, flat_starts.new_tensor([bsz * seq])]).to(torch.int32)  # [num_docs+1]
    return PackMetadata(document_ids=document_ids, position_ids=position_ids,
                        cu_seqlens=cu_seqlens, loss_mask=~is_eod)


def pack_metadata_extension(tokens: torch.Tensor, eod_id: int) -> PackMetadata:
    """The csrc kernel (C++ on CPU tensors, CUDA on GPU tensors) behind the same contract as
    `pack_metadata_reference`."""
    from megatron_domain.kernels.extension import load_extension

    document_ids, position_ids, cu_seqlens = load_extension().pack_metadata(tokens.long(), int(eod_id))
    return PackMetadata(document_ids=document_ids, position_ids=position_ids, cu_seqlens=cu_seqlens,
                        loss_mask=tokens != eod_id)
