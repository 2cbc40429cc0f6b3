"""Attention over packed rows: each token attends causally and only within its own document.

Backends (`model.attention_backend`), all with the same contract q [B, Hq, S, D],
k/v [B, Hkv, S, D] -> [B, Hq, S, D] and tested against a dense masked reference:

- `sdpa` (default, CPU and GPU): `scaled_dot_product_attention` with a boolean
  document-causal mask, or `is_causal=True` when no row holds more than one document; in bf16
  training on a CPU with AVX-512-BF16 (AMX or not), its fused forward with our csrc backward;
- `flex` (GPU): FlexAttention with a document-causal BlockMask (compiled; on CPU torch has
  no FlexAttention backward, so training with it there is refused);
- `flash_varlen` (GPU, flash-attn installed): the packed rows flattened to [B*S, H, D] with
  per-document `cu_seqlens`, no mask at all;
- `te` (GPU, Transformer Engine installed): TE's DotProductAttention in the same THD layout.

`AttentionContext.build` computes once per forward what the backend needs (mask, block mask
or cu_seqlens).

Shared prefixes (the DPO shared-prompt layout): with `prefix_ids` [B, S], query i may also
attend key j of another document when document_ids[j] == prefix_ids[i] (j <= i). Two
completions of one prompt then both see the prompt but not each other. `sdpa` and `flex`
support it; the varlen backends (one contiguous document per sequence) do not.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_domain.kernels.cpu_attention import cpu_flash_attention, runs_here

BACKENDS = ("sdpa", "flex", "flash_varlen", "te")


PREFIX_BACKENDS = ("sdpa", "flex")


def document_causal_mask(document_ids: torch.Tensor, prefix_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask [B, 1, S, S]: True where query i may attend key j (j <= i, same document,
    or key j in the document `prefix_ids[i]` names)."""
    seq_len = document_ids.shape[-1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=document_ids.device).tril()  # [S, S]
    allowed = document_ids[:, :, None] == document_ids[:, None, :]  # [B, S, S]
    if prefix_ids is not None:
        allowed = allowed | (prefix_ids[:, :, None] == document_ids[:, None, :])  # [B, S, S]
    return (allowed & causal)[:, None]  # [B, 1, S, S]


def dense_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor,
                             dtype: torch.dtype = torch.float64, prefix_ids: torch.Tensor | None = None
                             ) -> torch.Tensor:
    """The reference every backend is tested against: softmax(q k^T / sqrt(d)) v over the
    document-causal mask, spelled out in `dtype`. q [B, Hq, S, D], k/v [B, Hkv, S, D],
    document_ids [B, S] -> [B, Hq, S, D]."""
    groups = q.shape[1] // k.shape[1]
    q, k, v = q.to(dtype), k.to(dtype).repeat_interleave(groups, 1), v.to(dtype).repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5  # [B, Hq, S, S]
    allowed = document_causal_mask(document_ids, prefix_ids)  # [B, 1, S, S]
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v  # [B, Hq, S, D]


def varlen_boundaries(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """document_ids [B, S] -> (cu_seqlens [docs + 1] int32 over the flattened B*S tokens, longest document)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)  # [B, S]
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = starts.flatten().nonzero().squeeze(1)  # [docs]
    cu_seqlens = torch.cat([first, first.new_tensor([document_ids.numel()])]).to(torch.int32)  # [docs + 1]
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


@dataclass
class AttentionContext:
    """What every layer's attention needs about the packing, computed once per forward."""

    mask: torch.Tensor | None = None  # sdpa: [B, 1, S, S] bool, or None when plain causal suffices
    block_mask: object = None  # flex: a BlockMask
    cu_seqlens: torch.Tensor | None = None  # flash_varlen / te: [docs + 1] int32
    max_seqlen: int = 0
    kv_cache: object = None  # a models.kv_cache.KVCache during incremental decoding (mask and buffers)
    csrc_backward: bool = False  # sdpa: bf16 training on a CPU may use the csrc backward (kernels/cpu_attention.py)

    @staticmethod
    def build(document_ids: torch.Tensor | None, backend: str = "sdpa", shape: tuple[int, int] | None = None,
              prefix_ids: torch.Tensor | None = None, csrc_backward: bool = False) -> "AttentionContext":
        """The context for `backend`; `document_ids` [B, S] (None: one document per row, then
        `shape` = (B, S) is needed by the backends that take explicit boundaries); `prefix_ids`
        [B, S] shared prefixes (sdpa and flex only); `csrc_backward`: `cpu_attention_ready` said
        the sdpa backend may use the csrc backward in this forward."""
        if prefix_ids is not None and backend not in PREFIX_BACKENDS:
            raise ValueError(f"model.attention_backend={backend} cannot share a prompt between two completions "
                             f"(needs one of {', '.join(PREFIX_BACKENDS)}); set dpo.shared_prompt: false")
        if backend == "sdpa":
            if prefix_ids is None and (document_ids is None or bool((document_ids == document_ids[:, :1]).all())):
                return AttentionContext(csrc_backward=csrc_backward)
            return AttentionContext(mask=document_causal_mask(document_ids, prefix_ids), csrc_backward=csrc_backward)
        if document_ids is None:
            document_ids = torch.arange(shape[0])[:, None].expand(shape)  # [B, S] one document per row
        if backend == "flex":
            return AttentionContext(block_mask=document_block_mask(document_ids, prefix_ids))
        cu_seqlens, max_seqlen = varlen_boundaries(document_ids)
        return AttentionContext(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def sdpa_native_gqa(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether SDPA's fused kernel takes the grouped KV heads as they are (`enable_gqa`) here:
    on a CPU in bf16 / fp16 (the flash kernel, with or without a mask; measured on bench-20m's
    shapes, bf16: forward + backward 58 -> 48 ms per layer causal, 73 -> 66 with a document
    mask, and no [B, Hq, S, D] copies of K and V); on CUDA only the flash kernel does (no mask,
    fp16 / bf16, sm80+), elsewhere enable_gqa falls back to the unfused math kernel. fp32 on a
    CPU keeps the repeated heads: the CPU flash kernel takes them natively there too, but that
    changes fp32 training's rounding, and the fp32 demo's SFT format gate (passed by a few
    points) was measured at 88.9% against its 90% minimum on a run trained that way."""
    if q.device.type == "cpu":
        return q.dtype in (torch.float16, torch.bfloat16)
    return (q.device.type == "cuda" and mask is None and q.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(q.device)[0] >= 8)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """q [B, Hq, S, D], k/v [B, Hkv, S, D] -> [B, Hq, S, D]; GQA natively where the fused
    kernel supports it (`sdpa_native_gqa`), else by repeating the KV heads. Training in bf16 on
    a CPU takes the csrc attention backward (kernels/cpu_attention.py) where it can run."""
    if ctx.csrc_backward and runs_here(q):  # training in bf16 on a CPU: the same fused forward, the csrc backward
        return cpu_flash_attention(q, k, v, ctx.mask)  # [B, Hq, S, D]
    groups = q.shape[1] // k.shape[1]
    native = groups > 1 and sdpa_native_gqa(q, ctx.mask)
    if groups > 1 and not native:
        k = k.repeat_interleave(groups, dim=1)  # [B, Hq, S, D]
        v = v.repeat_interleave(groups, dim=1)  # [B, Hq, S, D]
    if ctx.mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=native)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, enable_gqa=native)


def document_block_mask(document_ids: torch.Tensor, prefix_ids: torch.Tensor | None = None):
    """FlexAttention BlockMask of the document-causal pattern of document_ids [B, S] (with
    shared prefixes when `prefix_ids` [B, S] is given)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

    def prefix_causal(b, h, q_idx, kv_idx):
        return document_causal(b, h, q_idx, kv_idx) | (
            (q_idx >= kv_idx) & (prefix_ids[b, q_idx] == document_ids[b, kv_idx]))

    bsz, seq = document_ids.shape
    return create_block_mask(document_causal if prefix_ids is None else prefix_causal, bsz, None, seq, seq,
                             device=document_ids.device)


@functools.cache
def _compiled_flex_attention():
    """flex_attention compiled once per process (eager FlexAttention materializes the scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """FlexAttention with the context's document BlockMask; compiled on CUDA, eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention as eager_flex

    attend = _compiled_flex_attention() if q.is_cuda else eager_flex
    return attend(q, k, v, block_mask=ctx.block_mask, enable_gqa=q.shape[1] != k.shape[1])  # [B, Hq, S, D]


def to_packed_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] -> [B*S, H, D] (the THD layout of the varlen kernels)."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def from_packed_heads(x: torch.Tensor, bsz: int) -> torch.Tensor:
    """[B*S, H, D] -> [B, H, S, D]."""
    return x.reshape(bsz, -1, x.shape[1], x.shape[2]).transpose(1, 2)


def flash_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """flash-attn's varlen kernel over the flattened packed rows (GQA native)."""
    from megatron_domain.models.flash import flash_attn_varlen

    out = flash_attn_varlen(to_packed_heads(q), to_packed_heads(k), to_packed_heads(v), ctx.cu_seqlens,
                            ctx.max_seqlen)  # [B*S, Hq, D]
    return from_packed_heads(out, q.shape[0])


def te_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """Transformer Engine's fused attention over the flattened packed rows."""
    from megatron_domain.models.te import te_packed_attention

    out = te_packed_attention(to_packed_heads(q), to_packed_heads(k), to_packed_heads(v), ctx.cu_seqlens,
                              ctx.max_seqlen)  # [B*S, Hq, D]
    return from_packed_heads(out, q.shape[0])


ATTENTION_BACKENDS = {"sdpa": sdpa_attention, "flex": flex_attention, "flash_varlen": flash_varlen_attention,
                      "te": te_attention}
