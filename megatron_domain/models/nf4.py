"""QLoRA's frozen base in 4-bit NormalFloat (Dettmers et al. 2023), via torchao's NF4Tensor:
64-value blocks share one absmax scale, the scales themselves are 8-bit double-quantized, so
a weight takes ~0.52 bytes/parameter, about 1/4 of bf16. The matmul dequantizes to the
activation dtype on the fly; only the LoRA adapters (fp32) receive gradients.

Why torchao and not bitsandbytes: torchao's NF4 is written in plain torch ops, so it runs on
this CPU (and on GPUs) with no native kernels, and torchao is already DESIGN.md's FP8
library; bitsandbytes' 4-bit path needs its CUDA (or a platform-specific) backend. This module
is the only importer of torchao for NF4.
"""

from __future__ import annotations

import torch
import torch.nn as nn

BLOCK_SIZE = 64


def _nf4():
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, linear_nf4, to_nf4
    except ImportError as exc:
        raise ImportError("lora.quantize_base=nf4 needs torchao: pip install 'megatron-domain[qlora]' "
                          "(or pip install torchao)") from exc
    return NF4Tensor, linear_nf4, to_nf4


def _scaler_block_size(numel: int) -> int:
    """torchao's default 256 scales per double-quantization block, or the largest power of two
    that divides the number of scales (small test shapes)."""
    scales = numel // BLOCK_SIZE
    size = 256
    while size > 1 and scales % size:
        size //= 2
    return size


def is_nf4(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is an NF4-quantized weight."""
    return type(tensor).__name__ == "NF4Tensor"


def nf4_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ dequantized(weight [out, in])^T in x's dtype."""
    _, linear_nf4, _ = _nf4()
    return linear_nf4(x, weight)


@torch.no_grad()
def quantize_frozen_linears(model: nn.Module) -> int:
    """Replace the frozen base weight of every LoRA linear by its NF4 form; returns the number
    of quantized weights. Shapes must be divisible by the 64-value block."""
    from megatron_domain.models.lora import lora_modules

    _, _, to_nf4 = _nf4()
    count = 0
    for module in lora_modules(model):
        weight = module.weight
        if weight.numel() % BLOCK_SIZE:
            raise ValueError(f"lora.quantize_base=nf4: a {tuple(weight.shape)} weight is not a multiple of the "
                             f"{BLOCK_SIZE}-value NF4 block")
        quantized = to_nf4(weight.detach().to(torch.bfloat16), block_size=BLOCK_SIZE,
                           scaler_block_size=_scaler_block_size(weight.numel()))
        module.weight = nn.Parameter(quantized, requires_grad=False)
        count += 1
    return count


def weight_bytes(tensor: torch.Tensor) -> int:
    """Bytes a weight occupies (all inner tensors of an NF4 weight)."""
    if is_nf4(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(getattr(tensor, n).numel() * getattr(tensor, n).element_size() for n in names)
    return tensor.numel() * tensor.element_size()
