"""torchao, the only module that imports it: QLoRA's NF4 base weights and float8 training linears.

NF4: QLoRA's frozen base in 4-bit NormalFloat (Dettmers et al. 2023), via torchao's NF4Tensor:
64-value blocks share one absmax scale, the scales themselves are 8-bit double-quantized, so
a weight takes ~0.52 bytes/parameter, about 1/4 of bf16. The matmul dequantizes to the
activation dtype on the fly; only the LoRA adapters (fp32) receive gradients.

Why torchao and not bitsandbytes: torchao's NF4 is written in plain torch ops, so it runs on
this CPU (and on GPUs) with no native kernels, and torchao is already DESIGN.md's FP8
library; bitsandbytes' 4-bit path needs its CUDA (or a platform-specific) backend.

Float8 (`fp8.backend: float8`): every decoder linear becomes torchao's Float8Linear (dynamic
scaling: tensorwise, or rowwise with `fp8.recipe: rowwise`); the output head (`lm_head`) stays in
high precision, as in torchtitan. Inputs, weights and output gradients are cast to e4m3/e5m2 per
matmul; on a GPU without FP8 tensor cores, or on CPU, `fp8.emulate: true` runs the same
casts with high-precision matmuls (what the tests use). Float8Linear keeps nn.Linear's
parameters, so DTensor TP styles and FSDP2 apply to it as to any linear.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from megatron_domain.config import FP8_RECIPES

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
def nf4_parameter(weight: torch.Tensor) -> nn.Parameter:
    """The frozen NF4 form of a weight (QLoRA's base); its size must be a multiple of the
    64-value block."""
    _, _, to_nf4 = _nf4()
    if weight.numel() % BLOCK_SIZE:
        raise ValueError(f"lora.quantize_base=nf4: a {tuple(weight.shape)} weight is not a multiple of the "
                         f"{BLOCK_SIZE}-value NF4 block")
    quantized = to_nf4(weight.detach().to(torch.bfloat16), block_size=BLOCK_SIZE,
                       scaler_block_size=_scaler_block_size(weight.numel()))
    return nn.Parameter(quantized, requires_grad=False)


def weight_bytes(tensor: torch.Tensor) -> int:
    """Bytes a weight occupies (all inner tensors of an NF4 weight)."""
    if is_nf4(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(getattr(tensor, n).numel() * getattr(tensor, n).element_size() for n in names)
    return tensor.numel() * tensor.element_size()


def float8_filter(module: nn.Module, name: str) -> bool:
    """Which linears go float8: decoder projections whose dims are multiples of 16 (FP8 GEMM
    alignment); the output head (`lm_head`) stays in high precision."""
    return (isinstance(module, nn.Linear) and name.rpartition(".")[2] != "lm_head"
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert_to_float8(model: nn.Module, recipe: str = "tensorwise", emulate: bool = False) -> int:
    """Swap the decoder's nn.Linear modules for torchao Float8Linear in place (works on the
    meta device, before parallelization); returns how many were converted."""
    import dataclasses

    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as exc:
        raise ImportError("fp8.backend=float8 needs torchao: pip install torchao") from exc
    if recipe not in FP8_RECIPES["float8"]:
        raise ValueError(f"fp8.recipe: {recipe!r} is not a torchao float8 recipe; choose one of "
                         f"{', '.join(FP8_RECIPES['float8'])}")
    config = Float8LinearConfig() if recipe == "tensorwise" else Float8LinearConfig.from_recipe_name(recipe)
    config = dataclasses.replace(config, emulate=emulate)
    before = sum(isinstance(m, nn.Linear) and type(m) is not nn.Linear for m in model.modules())
    convert_to_float8_training(model, module_filter_fn=float8_filter, config=config)
    return sum(isinstance(m, nn.Linear) and type(m) is not nn.Linear for m in model.modules()) - before
