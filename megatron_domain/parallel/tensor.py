"""Tensor and sequence parallelism with DTensor (Megatron-LM's layout, torchtitan's plan).

Per decoder layer: q/k/v and gate/up are column-parallel (each rank owns whole heads and a
slice of the MLP width), o/down are row-parallel. The embedding is vocab-parallel (row-wise
over the vocabulary) and the output layer column-parallel with its logits left sharded over
the vocabulary, so `loss_parallel` computes the cross-entropy without gathering full-vocabulary
logits. With sequence parallelism the residual stream and the RMSNorms are sharded along
the sequence; the attention and MLP inputs are all-gathered, their outputs reduce-scattered.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel, PrepareModuleInput, PrepareModuleOutput, RowwiseParallel, SequenceParallel, loss_parallel,
    parallelize_module)

from megatron_domain.models.llama import Transformer


class ColwiseWithAdapter(ColwiseParallel):
    """Column-parallel linear that also shards a LoRA adapter consistently: B [out, r] split
    over outputs like the weight, A [r, in] replicated. (Overrides the style's partition hook:
    torch's version shards every parameter along dim 0, which would split A's rank dim.)"""

    def _partition_linear_fn(self, name, module, device_mesh):
        for pname, param in list(module.named_parameters(recurse=False)):
            placement = Replicate() if pname == "lora_a" else Shard(0)
            _register_distributed(module, pname, param, device_mesh, placement)


class RowwiseWithAdapter(RowwiseParallel):
    """Row-parallel linear with a consistently sharded LoRA adapter: A [r, in] split over
    inputs like the weight, B [out, r] and the bias replicated; the adapter's partial sums are
    reduced together with the base layer's output."""

    def _partition_linear_fn(self, name, module, device_mesh):
        for pname, param in list(module.named_parameters(recurse=False)):
            placement = Shard(1) if pname in ("weight", "lora_a") else Replicate()
            _register_distributed(module, pname, param, device_mesh, placement)


def _register_distributed(module: nn.Module, name: str, param: torch.Tensor, mesh: DeviceMesh, placement) -> None:
    module.register_parameter(name, nn.Parameter(distribute_tensor(param, mesh, [placement]),
                                                 requires_grad=param.requires_grad))


def top_level_plan(model: Transformer, sequence_parallel: bool) -> dict:
    """Styles for the embedding, final norm and output layer present in `model` (a chunk)."""
    residual = Shard(1) if sequence_parallel else Replicate()  # layout of the [B, S, H] residual stream
    plan: dict = {}
    if model.embed_tokens is not None:
        plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
    if model.norm is not None and sequence_parallel:
        plan["norm"] = SequenceParallel()
    if model.norm is not None and model.lm_head is not None:
        plan["lm_head"] = ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1), use_local_output=False)
    return plan


def layer_plan(sequence_parallel: bool) -> dict:
    """Styles for one decoder layer's submodules."""
    residual = Shard(1) if sequence_parallel else Replicate()
    plan = {
        "self_attn.q_proj": ColwiseWithAdapter(),
        "self_attn.k_proj": ColwiseWithAdapter(),
        "self_attn.v_proj": ColwiseWithAdapter(),
        "self_attn.o_proj": RowwiseWithAdapter(output_layouts=residual),
        "mlp.gate_proj": ColwiseWithAdapter(),
        "mlp.up_proj": ColwiseWithAdapter(),
        "mlp.down_proj": RowwiseWithAdapter(output_layouts=residual),
    }
    if sequence_parallel:
        plan.update({
            "input_layernorm": SequenceParallel(),
            "post_attention_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None),
                                            use_local_output=True),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                      use_local_output=True),
        })
    return plan


def is_tensor_parallel_sharded(name: str, model: Transformer) -> bool:
    """Whether the parameter `name` (of a not yet parallelized `model`) is split over TP ranks
    by this module's plans (column/row-parallel); the others are replicated."""
    module_name, param_name = name.rsplit(".", 1)
    parts = module_name.split(".", 2)
    if parts[0] == "layers" and len(parts) == 3:
        style = layer_plan(False).get(parts[2])
    else:
        style = top_level_plan(model, False).get(module_name)
    if isinstance(style, ColwiseWithAdapter):
        return param_name != "lora_a"
    if isinstance(style, RowwiseWithAdapter):
        return param_name in ("weight", "lora_a")
    return isinstance(style, (ColwiseParallel, RowwiseParallel))


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard `model` (a full model or a pipeline chunk) over `tp_mesh` in place."""
    residual = Shard(1) if sequence_parallel else Replicate()
    top = top_level_plan(model, sequence_parallel)
    if top:
        parallelize_module(model, tp_mesh, top)
    if model.norm is not None and model.lm_head is None:
        # tied output: F.linear(hidden, embedding weight sharded over the vocabulary) needs
        # the final hidden states as a replicated DTensor and yields vocab-sharded logits
        parallelize_module(model.norm, tp_mesh, PrepareModuleOutput(
            output_layouts=residual, desired_output_layouts=Replicate(), use_local_output=False))
    for layer in model.layers.values():
        parallelize_module(layer, tp_mesh, layer_plan(sequence_parallel))


def loss_parallel_context(tp: int):
    """`loss_parallel()` when logits are vocab-sharded (tp > 1); wrap forward AND backward in it."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()
