"""LoRA as a model converter (Hu et al. 2021): y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,
with A [r, in] ~ Kaiming-uniform, B [out, r] = 0 so training starts from the base model.

`apply_lora` swaps the targeted nn.Linear layers of a (meta-device) model for `LoRALinear`,
which keeps the base `weight`/`bias` under their original names (checkpoints and HF names
are unchanged) and adds `lora_a`/`lora_b`; every other parameter is frozen. Tensor
parallelism shards the adapters consistently with their base layer (see parallel/tensor.py):
column-parallel base -> B sharded over outputs, A replicated; row-parallel base -> A sharded
over inputs, B replicated (the adapter's partial sums join the base layer's reduction).

`merge_lora` folds B A into W (keeping the exact base weights aside) and `unmerge_lora` puts
the saved base weights back, bitwise.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_domain.config import LORA_TARGETS
from megatron_domain.models.llama import canonical_name, copy_full_tensor, initial_value
from megatron_domain.models.ao import is_nf4, nf4_linear, nf4_parameter



class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank adapter; `weight`/`bias` are the frozen base."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float, dropout: float,
                 device=None):
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.rank = rank
        self.scaling = alpha / rank
        self.dropout = dropout
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank, device=device))
        self.merged = False
        self.adapter_enabled = True  # False inside `adapters_disabled`: the frozen base alone
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        if is_nf4(self.weight):  # QLoRA: 4-bit frozen base, dequantized on the fly
            out = nf4_linear(x, self.weight)  # [..., out]
            out = out + self.bias if self.bias is not None else out
        else:
            out = F.linear(x, self.weight, self.bias)  # [..., out]
        if self.merged or not self.adapter_enabled:
            return out
        x = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        return out + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling  # [..., out]


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: tuple[str, ...]) -> list[str]:
    """Replace every nn.Linear whose attribute name is in `targets` by a LoRALinear (same
    device, typically meta) and freeze everything else; returns the adapted module names."""
    adapted = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                lora = LoRALinear(child.in_features, child.out_features, child.bias is not None, rank, alpha,
                                  dropout, device=child.weight.device)
                setattr(parent, child_name, lora)
                adapted.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    if not adapted:
        raise ValueError(f"lora.targets: none of {list(targets)} names a linear layer of the model; "
                         f"valid targets: {', '.join(LORA_TARGETS)}")
    freeze_base(model)
    return adapted


def is_adapter_param(name: str) -> bool:
    """Whether a parameter (or state-dict key) is a LoRA adapter weight."""
    return name.endswith(("lora_a", "lora_b"))


def freeze_base(model: nn.Module) -> None:
    """Only LoRA adapters train (re-applied after sharding: some parallel styles re-create
    parameters as trainable)."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_param(name))


@torch.no_grad()
def init_lora_weights(model: nn.Module, seed: int) -> None:
    """Initialize only the adapters (A random, B = 0), e.g. after loading the base weights."""
    for name, param in model.named_parameters():
        name = canonical_name(name)
        if is_adapter_param(name):
            copy_full_tensor(param, initial_value(name, tuple(param.shape), seed, 0.0))


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    """Every LoRALinear of a model."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@torch.no_grad()
@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run `model` as its frozen base: every LoRA adapter is skipped inside the block (the DPO
    reference of a LoRA run, with no second copy of the weights). Merged adapters cannot be
    skipped: that is an error."""
    modules = lora_modules(model)
    if any(m.merged for m in modules):
        raise RuntimeError("adapters_disabled: the adapters are merged into the base weights; unmerge them first")
    for module in modules:
        module.adapter_enabled = False
    try:
        yield model
    finally:
        for module in modules:
            module.adapter_enabled = True


def merge_lora(model: nn.Module) -> None:
    """W <- W + (alpha/r) B A for every adapter; the exact base weights are kept for unmerge."""
    for module in lora_modules(model):
        if module.merged:
            continue
        if is_nf4(module.weight):
            raise ValueError("merge: the base is NF4-quantized (QLoRA); merge the adapter into the full-precision "
                             "base instead (load it without lora.quantize_base)")
        module.register_buffer("base_weight", module.weight.detach().clone(), persistent=False)
        delta = (module.lora_b.float() @ module.lora_a.float()) * module.scaling  # [out, in]
        module.weight.copy_((module.weight.float() + delta).to(module.weight.dtype))
        module.merged = True


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    """Restore the base weights saved by `merge_lora`, bitwise."""
    for module in lora_modules(model):
        if not module.merged:
            continue
        module.weight.copy_(module.base_weight)
        del module.base_weight
        module.merged = False


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (DTensor shards counted at their full size)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


@torch.no_grad()
def quantize_frozen_linears(model: nn.Module) -> int:
    """Replace the frozen base weight of every LoRA linear by its NF4 form (QLoRA); returns the
    number of quantized weights."""
    count = 0
    for module in lora_modules(model):
        module.weight = nf4_parameter(module.weight)
        count += 1
    return count
