"""Attention over packed rows: each token attends causally and only within its own document.

The backend is chosen by `model.attention_backend`; `sdpa` (default) runs
`torch.nn.functional.scaled_dot_product_attention` with a boolean document-causal mask, or
with `is_causal=True` when no row of the batch holds more than one document.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask [B, 1, S, S]: True where query i may attend key j (j <= i, same document)."""
    seq_len = document_ids.shape[-1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=document_ids.device).tril()  # [S, S]
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # [B, S, S]
    return (same_doc & causal)[:, None]  # [B, 1, S, S]


@dataclass
class AttentionContext:
    """What every layer's attention needs about the packing, computed once per forward."""

    mask: torch.Tensor | None  # [B, 1, S, S] bool, or None when plain causal suffices

    @staticmethod
    def build(document_ids: torch.Tensor | None) -> "AttentionContext":
        """Document-causal masking when any row packs several documents, else plain causal."""
        if document_ids is None:
            return AttentionContext(mask=None)
        single_document = bool((document_ids == document_ids[:, :1]).all())
        return AttentionContext(mask=None if single_document else document_causal_mask(document_ids))


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """q [B, Hq, S, D], k/v [B, Hkv, S, D] -> [B, Hq, S, D]; GQA by repeating KV heads."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # [B, Hq, S, D]
        v = v.repeat_interleave(groups, dim=1)  # [B, Hq, S, D]
    if ctx.mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask)


ATTENTION_BACKENDS = {"sdpa": sdpa_attention}
