"""The one function that turns a meta-device model into a trainable one, in the fixed order
of DESIGN.md (torchtitan's parallelize): converters -> pipeline split -> TP -> activation
checkpointing -> compile -> FSDP -> materialize and init (or leave for a checkpoint load).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

import megatron_domain.kernels.cpu_attention  # noqa: F401  (registers torch.ops.megatron_domain.*)
from megatron_domain.config import Config, Fp8Config
from megatron_domain.models.llama import Transformer, materialize
from megatron_domain.models.lora import apply_lora, freeze_base
from megatron_domain.parallel.dims import ParallelDims
from megatron_domain.parallel.pipeline import build_pipeline_chunks
from megatron_domain.parallel.tensor import apply_tensor_parallel

# ops whose outputs selective checkpointing keeps: the matmuls, attention and TP collectives
# (expensive to recompute); norms, RoPE, SiLU and other elementwise ops are recomputed
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.megatron_domain.cpu_flash_attention.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops._c10d_functional.all_gather_into_tensor.default,
    torch.ops._c10d_functional.all_reduce.default,
}


@dataclass
class ParallelModel:
    """What one rank trains: its model chunks (one, or several virtual pipeline stages) and
    where it sits in the mesh."""

    parts: list[nn.Module]
    dims: ParallelDims
    mesh: DeviceMesh | None
    stage_indices: list[int] = field(default_factory=lambda: [0])
    num_stages: int = 1

    @property
    def has_first_stage(self) -> bool:
        """Whether this rank holds the embedding (stage 0)."""
        return 0 in self.stage_indices

    @property
    def has_last_stage(self) -> bool:
        """Whether this rank holds the output layer (and so computes the loss)."""
        return self.num_stages - 1 in self.stage_indices

    def parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of every part."""
        for part in self.parts:
            yield from part.parameters()

    def train(self, mode: bool = True) -> "ParallelModel":
        """Train (or eval) mode on every part."""
        for part in self.parts:
            part.train(mode)
        return self


def _save_matmuls_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_save_matmuls_policy)


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """`full`: recompute every decoder layer in backward; `selective`: keep matmul, attention
    and collective outputs, recompute the cheap ops (norms, RoPE, activations); `none`."""
    if mode == "none":
        return
    for key, layer in list(model.layers.items()):
        if mode == "full":
            model.layers[key] = checkpoint_wrapper(layer, preserve_rng_state=True)
        else:
            model.layers[key] = checkpoint_wrapper(layer, preserve_rng_state=True, context_fn=_selective_contexts)


def compile_problem(cfg: Config, dims: ParallelDims) -> str | None:
    """Why `train.compile` stays off for this run (None: compile). Each refusal is a measured
    failure on torch 2.13 (CPU, gloo), not a guess."""
    if not cfg.train.compile:
        return None
    if dims.tp > 1:
        return (f"train.compile left off: parallel.tp={dims.tp} (torch.compile of DTensor tensor-parallel layers "
                "fails in backward on torch 2.13, and with FSDP x TP it left the embedding gradient zero)")
    return None


def apply_compile(model: Transformer) -> None:
    """Regional compile: each decoder layer (after activation checkpointing wrapped it) is
    compiled on its own, so identical layers share one compiled graph."""
    for layer in model.layers.values():
        layer.compile()


def apply_fsdp(model: Transformer, dp_mesh: DeviceMesh, param_dtype: torch.dtype) -> None:
    """FSDP2: shard each decoder layer, then the rest (embedding, norm, output) at the root.
    Compute in `param_dtype` (bf16 when training in bf16), reduce gradients in fp32."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = list(model.layers.values())
    for i, layer in enumerate(layers):
        # the last layer's parameters are needed again right away by backward: keep them
        fully_shard(layer, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)


def apply_fp8(model: Transformer, fp8: Fp8Config) -> None:
    """The FP8 converter: torchao Float8Linear or Transformer Engine linears (optional
    packages, imported only when chosen)."""
    if fp8.backend == "float8":
        from megatron_domain.models.ao import convert_to_float8

        convert_to_float8(model, fp8.resolved_recipe, fp8.emulate)
    elif fp8.backend == "te":
        from megatron_domain.models.te import convert_to_te

        convert_to_te(model)


def data_parallel_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """FSDP's mesh: (dp_replicate, dp_shard) for HSDP, or dp_shard alone."""
    return mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]


def build_parallel_model(model: Transformer, cfg: Config, dims: ParallelDims, mesh: DeviceMesh | None,
                         device: torch.device, init_seed: int | None) -> ParallelModel:
    """Apply the transforms to a meta-device model in the fixed order, then allocate on
    `device`; initialize with `init_seed`, or leave uninitialized (None) for a checkpoint load."""
    if cfg.lora.rank > 0:  # converters come first: LoRA swaps linears before any split or sharding
        apply_lora(model, cfg.lora.rank, cfg.lora.scale_alpha, cfg.lora.dropout, tuple(cfg.lora.targets))
    apply_fp8(model, cfg.fp8)
    if dims.pp > 1:
        pp_rank = mesh["pp"].get_local_rank()
        chunks = build_pipeline_chunks(model, pp_rank, dims.pp, cfg.parallel.pp_virtual_stages,
                                       cfg.parallel.pp_schedule, cfg.parallel.pp_layers or None)
    else:
        chunks = [(0, model)]
    param_dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
    parts = []
    for _, part in chunks:
        if dims.tp > 1:
            apply_tensor_parallel(part, mesh["tp"], dims.sequence_parallel)
            if cfg.lora.rank > 0:
                freeze_base(part)
        apply_activation_checkpointing(part, cfg.train.activation_checkpointing)
        if cfg.train.compile and compile_problem(cfg, dims) is None:
            apply_compile(part)
        if dims.dp > 1:
            apply_fsdp(part, data_parallel_mesh(mesh, dims), param_dtype)
        parts.append(materialize(part, device, init_seed))
    return ParallelModel(parts=parts, dims=dims, mesh=mesh, stage_indices=[s for s, _ in chunks],
                         num_stages=dims.pp * (cfg.parallel.pp_virtual_stages if dims.pp > 1 else 1))


def reshard_fsdp(model: nn.Module) -> None:
    """Put every FSDP2 module of `model` back on its sharded parameters. Forwards outside a
    training step (generation at a stage's setup) leave the root unsharded (it does not reshard
    after forward), and an optimizer built then would hold the unsharded tensors, which are not
    the model's registered parameters once training reshards (measured: rs_sft at dp_shard=2
    failed at its first checkpoint with a KeyError in get_optimizer_state_dict)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
