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

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel, PrepareModuleInput, PrepareModuleOutput, RowwiseParallel, SequenceParallel, loss_parallel,
    parallelize_module)

from megatron_domain.models.llama import Transformer


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard `model` (a full model or a pipeline chunk) over `tp_mesh` in place."""
    residual = Shard(1) if sequence_parallel else Replicate()  # layout of the [B, S, H] residual stream
    top: dict = {}
    if model.embed_tokens is not None:
        top["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
    if model.norm is not None and sequence_parallel:
        top["norm"] = SequenceParallel()
    if model.norm is not None and model.lm_head is not None:
        top["lm_head"] = ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1), use_local_output=False)
    if top:
        parallelize_module(model, tp_mesh, top)
    if model.norm is not None and model.lm_head is None:
        # tied output: F.linear(hidden, embedding weight sharded over the vocabulary) needs
        # the final hidden states as a replicated DTensor and yields vocab-sharded logits
        parallelize_module(model.norm, tp_mesh, PrepareModuleOutput(
            output_layouts=residual, desired_output_layouts=Replicate(), use_local_output=False))
    for layer in model.layers.values():
        plan = {
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=residual),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=residual),
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
        parallelize_module(layer, tp_mesh, plan)


def loss_parallel_context(tp: int):
    """`loss_parallel()` when logits are vocab-sharded (tp > 1); wrap forward AND backward in it."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()
