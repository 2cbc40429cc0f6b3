"""The one function that turns a meta-device model into a trainable one, in the fixed order
of DESIGN.md: converters -> pipeline split -> TP -> activation checkpointing -> compile ->
FSDP -> materialize and init or load. (This build has the single-process path:
activation checkpointing and materialization; the parallel steps slot in before them.)
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from megatron_domain.config import Config
from megatron_domain.models.llama import Transformer, materialize


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """`full`: recompute every decoder layer in backward (non-reentrant checkpointing)."""
    if mode == "none":
        return
    for key, layer in list(model.layers.items()):
        model.layers[key] = checkpoint_wrapper(layer, preserve_rng_state=True)


def build_trainable_model(model: Transformer, cfg: Config, device: torch.device, init_seed: int | None) -> Transformer:
    """Apply the transforms to a meta-device model, then allocate it on `device`; initialize
    with `init_seed`, or leave uninitialized (None) for a checkpoint load that follows."""
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    return materialize(model, device, init_seed)
