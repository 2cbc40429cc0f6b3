"""Gradient norm and clipping over a model split across TP, FSDP and pipeline ranks.

torch's `clip_grad_norm_` sees one rank's parameters; with pipeline parallelism each rank
holds different layers, so the squared norms are summed over the pipeline group first.
DTensor gradients (TP/FSDP shards) are reduced to their full norm by DTensor itself.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _by_mesh(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Parameters with gradients grouped so each group is all plain tensors or all DTensors of
    one mesh (foreach kernels cannot mix them)."""
    groups: dict = {}
    for p in params:
        if p.grad is not None:
            key = id(p.grad.device_mesh) if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p)
    return list(groups.values())


def total_grad_norm(params: list[torch.Tensor], pp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """L2 norm of all gradients of the whole model (a plain fp32 scalar, equal on every rank)."""
    groups = _by_mesh(params)
    squared = torch.zeros((), dtype=torch.float32, device=groups[0][0].device if groups else "cpu")
    for group in groups:
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squared = squared + norm.float() ** 2
    if pp_group is not None:
        dist.all_reduce(squared, group=pp_group)
    return squared.sqrt()


def scale_grads_(params: list[torch.Tensor], factor: torch.Tensor) -> None:
    """Multiply every gradient by `factor` (a scalar tensor) in place, on each rank's local
    values. Scaling is linear, so this is right for every DTensor placement (Shard, Replicate,
    Partial). Not `torch.nn.utils.clip_grads_with_norm_`: with torch 2.11 it leaves Partial(sum)
    gradients unscaled (the replicated norm weights under sequence parallelism; measured, and
    guarded by tests/test_parallel.py)."""
    for group in _by_mesh(params):
        local = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in group]
        torch._foreach_mul_(local, factor.to(local[0].device))


def clip_grads(params: list[torch.Tensor], max_norm: float, pp_group: dist.ProcessGroup | None) -> float:
    """Scale gradients so their global norm is at most `max_norm` (0 = no clipping); returns
    the norm before clipping."""
    norm = total_grad_norm(params, pp_group)
    if max_norm > 0 and math.isfinite(max_norm):
        scale_grads_(params, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return float(norm)
