"""flash-attn (the only importer): the varlen kernel for packed rows (`model.attention_backend:
flash_varlen`). Documents are given by cu_seqlens over the flattened tokens, so no mask is
built; causal within each document."""

from __future__ import annotations

import torch


def flash_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [docs + 1] int32 -> [T, Hq, D]."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as exc:
        raise ImportError("model.attention_backend=flash_varlen needs flash-attn on a CUDA machine: "
                          "pip install flash-attn (or use sdpa / flex)") from exc
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
