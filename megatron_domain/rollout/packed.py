"""CPU decoding with prepacked linear weights.

A decode step multiplies a few dozen rows by every weight matrix: on CPU the time goes into
reading the weights, and oneDNN is up to 2.6x faster on such skinny products when the weight
is stored in its own blocked layout (measured on the bench-20m shapes: output layer 8.7 ->
3.3 ms, MLP 0.82 -> 0.50 ms per call at 64 rows). That is what inductor's freezing pass and
vLLM's CPU backend do; here torch's own ops for it (`torch.ops.mkldnn._reorder_linear_weight`
and `_linear_pointwise`, the ones inductor emits) are called directly, so the sampler needs
no compilation. `packed_linears` swaps every plain nn.Linear of a model (and a tied output
layer) for a `PackedLinear` holding a packed copy, for the duration of one generation, and
puts the originals back; weights changed by training between generations are repacked.
LoRA, FP8, quantized and tensor-parallel (DTensor) layers are left as they are.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor


def packing_available(device: torch.device) -> bool:
    """Whether this torch can pack linear weights for `device` (CPU with oneDNN)."""
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """Inference-only y = x W^T + b with W in oneDNN's blocked layout (a copy)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _packable(module: nn.Module) -> bool:
    return (type(module) is nn.Linear and module.weight.dtype in (torch.float32, torch.bfloat16)
            and not isinstance(module.weight, DTensor))


@contextlib.contextmanager
def packed_linears(model: nn.Module, batch_hint: int) -> Iterator[int]:
    """Within the block, `model`'s plain linear layers (and a tied output layer) run on packed
    weights; yields how many were packed. Everything is restored on exit, also on errors."""
    swapped: list[tuple[nn.Module, str, object]] = []
    try:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if _packable(child):
                    setattr(parent, name, PackedLinear(child.weight, child.bias, batch_hint))
                    swapped.append((parent, name, child))
        embed, norm = getattr(model, "embed_tokens", None), getattr(model, "norm", None)
        tied = hasattr(model, "lm_head") and model.lm_head is None and embed is not None and norm is not None
        if tied and embed.weight.dtype in (torch.float32, torch.bfloat16) and not isinstance(embed.weight, DTensor):
            model.lm_head = PackedLinear(embed.weight, None, batch_hint)  # the forward's untied branch uses it
            swapped.append((model, "lm_head", None))
        yield len(swapped)
    finally:
        for parent, name, original in reversed(swapped):
            setattr(parent, name, original)
