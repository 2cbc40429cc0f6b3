"""The `dpo_loss` op: per-token log-probs of the policy and the reference model over packed
chosen/rejected sequences -> per-sequence sums, the DPO-family loss and the metrics people
watch. The math is `losses.segment_sums` + `losses.dpo_pair_losses`; the fused version runs
the csrc kernels (C++ on CPU tensors, CUDA on GPU tensors) with a custom backward.

Segments: `segment_ids[t]` = 2p for a token of pair p's chosen response, 2p + 1 for its
rejected response, -1 for tokens that do not count (prompts, padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_domain.losses import DPO_LOSS_TYPES, dpo_pair_losses, segment_sums


@dataclass
class DpoOutput:
    """Loss (mean over pairs) and per-pair values; rewards are beta * (log pi - log pi_ref)."""

    loss: torch.Tensor  # scalar
    losses: torch.Tensor  # [P]
    policy_chosen: torch.Tensor  # [P] sequence log-probs
    policy_rejected: torch.Tensor  # [P]
    chosen_rewards: torch.Tensor  # [P]
    rejected_rewards: torch.Tensor  # [P]

    def metrics(self) -> dict[str, float]:
        """The numbers a DPO run logs: rewards, margin, accuracy (chosen reward > rejected)."""
        margins = self.chosen_rewards - self.rejected_rewards
        return {"loss": float(self.loss.detach()), "rewards/chosen": float(self.chosen_rewards.mean()),
                "rewards/rejected": float(self.rejected_rewards.mean()), "rewards/margin": float(margins.mean()),
                "rewards/accuracy": float((margins > 0).float().mean()),
                "logps/chosen": float(self.policy_chosen.mean()), "logps/rejected": float(self.policy_rejected.mean())}


def _check(loss_type: str, num_pairs: int, policy_logps: torch.Tensor, segment_ids: torch.Tensor) -> None:
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo loss_type {loss_type!r} unknown; choose one of {', '.join(DPO_LOSS_TYPES)}")
    if policy_logps.shape != segment_ids.shape or policy_logps.dim() != 1:
        raise ValueError(f"dpo_loss: log-probs {tuple(policy_logps.shape)} and segment_ids "
                         f"{tuple(segment_ids.shape)} must both be [tokens]")
    if num_pairs < 1:
        raise ValueError(f"dpo_loss: num_pairs must be >= 1, got {num_pairs}")


def _output(losses: torch.Tensor, policy_sums: torch.Tensor, reference_sums: torch.Tensor, beta: float) -> DpoOutput:
    rewards = beta * (policy_sums.detach() - reference_sums.detach())  # [2P]
    return DpoOutput(loss=losses.mean(), losses=losses, policy_chosen=policy_sums[0::2].detach(),
                     policy_rejected=policy_sums[1::2].detach(), chosen_rewards=rewards[0::2],
                     rejected_rewards=rewards[1::2])


def dpo_loss_reference(policy_logps: torch.Tensor, reference_logps: torch.Tensor, segment_ids: torch.Tensor,
                       num_pairs: int, beta: float = 0.1, loss_type: str = "sigmoid",
                       label_smoothing: float = 0.0) -> DpoOutput:
    """Pure torch: policy_logps, reference_logps, segment_ids [T] -> DpoOutput (autograd
    flows into policy_logps; the reference is treated as a constant)."""
    _check(loss_type, num_pairs, policy_logps, segment_ids)
    policy_sums = segment_sums(policy_logps, segment_ids, 2 * num_pairs)  # [2P]
    reference_sums = segment_sums(reference_logps.detach(), segment_ids, 2 * num_pairs)  # [2P]
    losses = dpo_pair_losses(policy_sums[0::2], policy_sums[1::2], reference_sums[0::2], reference_sums[1::2],
                             beta, loss_type, label_smoothing)  # [P]
    return _output(losses, policy_sums, reference_sums, beta)


class _FusedDpo(torch.autograd.Function):
    """csrc forward (sums + per-pair loss and dL/dh in one call) and backward (one pass over tokens)."""

    @staticmethod
    def forward(ctx, policy_logps, reference_logps, segment_ids, num_pairs, beta, loss_type, label_smoothing):
        from megatron_domain.kernels.extension import load_extension

        ext = load_extension()
        policy_sums, reference_sums, losses, dloss_dh = ext.dpo_forward(
            policy_logps.detach(), reference_logps.detach(), segment_ids.long(), num_pairs, beta, label_smoothing,
            DPO_LOSS_TYPES.index(loss_type))
        ctx.save_for_backward(dloss_dh, segment_ids.long())
        ctx.policy_dtype = policy_logps.dtype
        ctx.mark_non_differentiable(policy_sums, reference_sums)
        return losses, policy_sums, reference_sums

    @staticmethod
    def backward(ctx, grad_losses, _grad_policy_sums, _grad_reference_sums):
        from megatron_domain.kernels.extension import load_extension

        dloss_dh, segment_ids = ctx.saved_tensors
        grad = load_extension().dpo_backward(grad_losses.contiguous(), dloss_dh, segment_ids)  # [T] fp32
        return grad.to(ctx.policy_dtype), None, None, None, None, None, None


def dpo_loss_fused(policy_logps: torch.Tensor, reference_logps: torch.Tensor, segment_ids: torch.Tensor,
                   num_pairs: int, beta: float = 0.1, loss_type: str = "sigmoid",
                   label_smoothing: float = 0.0) -> DpoOutput:
    """The csrc kernels (C++ for CPU tensors, CUDA for GPU tensors) behind the contract of
    `dpo_loss_reference`."""
    _check(loss_type, num_pairs, policy_logps, segment_ids)
    losses, policy_sums, reference_sums = _FusedDpo.apply(policy_logps, reference_logps, segment_ids, num_pairs,
                                                          float(beta), loss_type, float(label_smoothing))
    return _output(losses, policy_sums, reference_sums, beta)
