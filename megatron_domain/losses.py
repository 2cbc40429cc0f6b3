"""Pure reference math for the training objectives. Every fused kernel is tested against these.

Conventions: `logits` [N, V] (a vocab-sharded DTensor under tensor parallelism is accepted
where noted; call inside `loss_parallel()`) (any float dtype, computed in fp32), `labels` [N] int64,
`loss_mask` [N] bool/float (1 = the token's prediction counts). Losses return *sums* plus the
number of counted tokens, so the engine can normalize exactly over micro-batches and ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label_i | context_i) = logits[i, y_i] - logsumexp_v logits[i, v];  [N, V], [N] -> [N]."""
    logits = logits.float()
    return logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # [N]


def masked_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor,
                             loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM loss   L = - sum_i m_i log p(y_i | x_<i)   and   n = sum_i m_i.

    logits [N, V] (or vocab-sharded DTensor), labels [N], loss_mask [N] -> (L scalar fp32, n scalar). Masked positions may
    hold any label id (they are replaced by 0 before the gather)."""
    mask = loss_mask.float()
    safe_labels = torch.where(mask > 0, labels, torch.zeros_like(labels))  # [N]
    nll = F.cross_entropy(logits.float(), safe_labels, reduction="none")  # [N]
    if isinstance(nll, DTensor):  # vocab-parallel logits under loss_parallel(): nll is replicated
        nll = nll.to_local()
    return (nll * mask).sum(), mask.sum()


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
LENGTH_AVERAGED_LOSSES = ("ipo",)  # losses on per-token averaged log-ratios (see dpo_pair_losses)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution  H_i = logsumexp(z_i) - sum_v p_iv z_iv;  [N, V] -> [N]."""
    logits = logits.float()
    log_p = torch.log_softmax(logits, dim=-1)  # [N, V]
    return -(log_p.exp() * log_p).sum(-1)  # [N]


def segment_sums(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Per-sequence sums of per-token values in a packed batch: out[s] = sum_{t: seg_t = s} v_t.

    values [T] (summed in fp32), segment_ids [T] int64 with -1 = not counted -> [num_segments] fp32."""
    counted = segment_ids >= 0  # [T]
    out = torch.zeros(num_segments, dtype=torch.float32, device=values.device)
    return out.index_add(0, segment_ids[counted], values.float()[counted])  # [num_segments]


def dpo_pair_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                    reference_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO-family losses from sequence log-probs (all [P]) -> [P].

    With h = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l)):
      sigmoid (DPO, Rafailov et al. 2023; with label smoothing eps: conservative DPO)
          L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
      ipo (Azar et al. 2023; beta plays tau)   L = (h - 1 / (2 beta))^2
      hinge (SLiC, Zhao et al. 2023)           L = max(0, 1 - beta h)
      robust (rDPO, Chowdhury et al. 2024; eps = label-flip rate < 1/2)
          L = (-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps)
    Log-probs are sums over each sequence's counted tokens, except for the losses in
    LENGTH_AVERAGED_LOSSES (ipo), whose callers pass per-token averages log pi(y) / |y| (the IPO
    authors' setting and TRL's: with sums the squared loss grows with the completion length)."""
    h = (policy_chosen.float() - policy_rejected.float()) - (reference_chosen.float() - reference_rejected.float())  # [P]
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "robust":
        return (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                + label_smoothing * F.logsigmoid(-beta * h)) / (1 - 2 * label_smoothing)
    raise ValueError(f"dpo loss_type {loss_type!r} unknown; choose one of {', '.join(DPO_LOSS_TYPES)}")
