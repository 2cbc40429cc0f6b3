"""The causal-LM step shared by every stage that trains next-token prediction on packed rows
(`pretrain`, `sft`): functions, not a base class. A packed batch holds tokens, labels,
loss_mask, position_ids and document_ids, all [B, S]."""

from __future__ import annotations

import functools
from typing import Callable

import torch

from megatron_domain.config import Config, fused_cross_entropy_enabled
from megatron_domain.kernels.registry import get_kernel
from megatron_domain.losses import masked_cross_entropy_sum
from megatron_domain.stages import PipelineBatch

IGNORE_INDEX = -100


def causal_lm_forward_step(batch: dict, model: torch.nn.Module):
    """Logits of the packed rows; the loss function sums masked next-token CE."""
    logits = model(batch["tokens"], batch["position_ids"], batch["document_ids"])  # [B, S, V]

    def loss_fn(output: torch.Tensor):
        loss_sum, count = masked_cross_entropy_sum(output.flatten(0, 1), batch["labels"].flatten(),
                                                   batch["loss_mask"].flatten())
        return loss_sum, count, {}

    return logits, loss_fn


def fused_causal_lm_step(logprobs_kernel: Callable):
    """The causal-LM step with the cross-entropy fused into the output layer
    (`kernels.fused_cross_entropy`): the model returns log p(label) through `logprobs_kernel`
    (kernels' linear_logprobs) at the positions the loss counts only (an SFT row's prompt
    tokens cost no output-layer work), so the [B, S, V] logits never exist in full. The kernel
    is told the loss (minus the mask-weighted sum) and computes its gradients in the forward pass."""

    def forward_step(batch: dict, model: torch.nn.Module):
        mask = batch["loss_mask"].flatten().float()  # [B*S] (per-token weights with weighted replay)
        scored = mask.nonzero().squeeze(1)  # [M]
        weights = mask.index_select(0, scored)  # [M]
        kernel = functools.partial(logprobs_kernel, loss_weights=-weights)
        logp = model(batch["tokens"], batch["position_ids"], batch["document_ids"],
                     targets=batch["labels"].flatten().index_select(0, scored), logprobs_kernel=kernel,
                     score_index=scored)  # [M] fp32

        def loss_fn(output: torch.Tensor):
            return -(output * weights).sum(), mask.sum(), {}

        return logp, loss_fn

    return forward_step


def select_forward_step(cfg: Config, device: torch.device):
    """`causal_lm_forward_step`, or its fused-cross-entropy form when kernels.fused_cross_entropy
    (resolved: `auto` is on wherever it runs)."""
    if not fused_cross_entropy_enabled(cfg):
        return causal_lm_forward_step
    kernels = cfg.kernels
    kernel = get_kernel("linear_logprobs", kernels.linear_logprobs, device)
    return fused_causal_lm_step(functools.partial(kernel, chunk_rows=kernels.logprob_chunk_rows))


def causal_lm_pipeline_batch(micro: list[dict]) -> PipelineBatch:
    """The step's micro-batches as one batch [n x b, S] (the schedule splits it back): tokens
    for stage 0, positions and document ids for every stage, and the labels with masked
    positions set to IGNORE_INDEX as the loss target."""
    batch = {k: torch.cat([m[k] for m in micro]) for k in micro[0] if torch.is_tensor(micro[0][k])}  # [n x b, S]
    target = torch.where(batch["loss_mask"], batch["labels"], torch.full_like(batch["labels"], IGNORE_INDEX))
    return PipelineBatch(inputs=batch["tokens"],
                         kwargs={"position_ids": batch["position_ids"], "document_ids": batch["document_ids"]},
                         target=target, loss_tokens=batch["loss_mask"].sum())


def causal_lm_pipeline_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed next-token CE of one pipeline micro-batch: logits [b, S, V], target [b, S]."""
    mask = target != IGNORE_INDEX
    loss_sum, _ = masked_cross_entropy_sum(output.flatten(0, 1), target.flatten(), mask.flatten())
    return loss_sum


def micro_batch_starts(consumed: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int) -> list[int]:
    """Global indices where this data-parallel rank's micro-batches of the next global batch
    start: rank r takes the r-th contiguous share, so the cursor (`consumed`) is global and
    stays exact when the data-parallel degree changes."""
    per_rank = global_batch // dp_size
    start = consumed + dp_rank * per_rank
    return [start + i for i in range(0, per_rank, micro_batch)]
