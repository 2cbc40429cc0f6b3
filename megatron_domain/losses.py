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
