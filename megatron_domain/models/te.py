"""Transformer Engine FP8 linears (`fp8.backend: te`); the only importer of transformer_engine.

Every decoder nn.Linear (same filter as the torchao path: dims multiple of 16, output head
excluded) becomes `transformer_engine.pytorch.Linear` with the same parameter names, created on
the meta device so the engine's materialize/initialize step treats it like any linear. Forward
passes run inside `te.fp8_autocast` with the chosen recipe: `delayed` (DelayedScaling, amax
history) or `current` (Float8CurrentScaling, per-tensor scales from the current step).
TE's own tensor parallelism is not wired in, so this backend runs with parallel.tp = 1.
"""

from __future__ import annotations


import functools

import torch
import torch.nn as nn

from megatron_domain.config import FP8_RECIPES
from megatron_domain.models.ao import float8_filter



def _te():
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common import recipe
    except ImportError as exc:
        raise ImportError("fp8.backend=te needs Transformer Engine: pip install 'megatron-domain[gpu]' "
                          "(transformer-engine[pytorch]) on a CUDA machine, or use fp8.backend=float8") from exc
    return te, recipe


def convert_to_te(model: nn.Module) -> int:
    """Replace the decoder linears by TE Linear modules (meta device, no data); returns the count."""
    te, _ = _te()
    targets = [(name, module) for name, module in model.named_modules() if float8_filter(module, name)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        replacement = te.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                params_dtype=module.weight.dtype, device="meta")
        setattr(parent, child, replacement)
    return len(targets)


def te_fp8_autocast(recipe_name: str):
    """The context every forward of a TE model runs in."""
    if recipe_name not in FP8_RECIPES["te"]:
        raise ValueError(f"fp8.recipe: {recipe_name!r} is not a Transformer Engine recipe; choose one of "
                         f"{', '.join(FP8_RECIPES['te'])}")
    te, recipe = _te()
    fp8_recipe = recipe.DelayedScaling() if recipe_name == "delayed" else recipe.Float8CurrentScaling()
    return te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe)




@functools.cache
def _te_attention_module(num_heads: int, num_kv_heads: int, head_dim: int):
    te, _ = _te()
    return te.DotProductAttention(num_heads, head_dim, num_gqa_groups=num_kv_heads, attn_mask_type="padding_causal",
                                  qkv_format="thd")


def te_packed_attention(q, k, v, cu_seqlens, max_seqlen: int):
    """TE fused attention, THD layout: q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [docs + 1] -> [T, Hq, D]."""
    module = _te_attention_module(q.shape[1], k.shape[1], q.shape[2])
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
    out = module(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens, max_seqlen_q=max_seqlen,
                 max_seqlen_kv=max_seqlen)  # [T, Hq * D]
    return out.view(q.shape[0], q.shape[1], q.shape[2])
