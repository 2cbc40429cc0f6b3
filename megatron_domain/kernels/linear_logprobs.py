"""The `linear_logprobs` op: hidden states [N, H] x output weight [V, H] + targets [N] ->
log p(target) per token (and optionally the entropy of each next-token distribution).

`linear_logprobs_reference` materializes the [N, V] logits. The chunked version walks over
blocks of rows so that only a [rows, V] slice of logits exists at a time, keeps three numbers
per token (max, sum of exp, target logit; plus sum p*z for the entropy) and recomputes each
slice in a custom backward. When the vocabulary is split over tensor-parallel ranks (each rank
holds weight rows [offset, offset + V_local)), the per-token statistics are merged across the
group (max, then sums) and the hidden-state gradient is all-reduced.

The per-slice math (statistics of a logits slice, and the logits slice turned into its
gradient in place) is a small strategy object: `TorchSliceMath` here, a Triton version in
`kernels/triton_logprobs.py`; the matmuls stay in torch (cuBLAS) either way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_domain.losses import token_entropy, token_logprobs


def linear_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              with_entropy: bool = False, group: dist.ProcessGroup | None = None,
                              chunk_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Full logits: hidden [N, H], weight [V, H], targets [N] -> (log p [N] fp32, entropy [N] fp32 or None).
    The whole vocabulary only (`group` must be None; `chunk_rows` is ignored)."""
    if group is not None:
        raise ValueError("kernels.linear_logprobs: the reference needs the whole vocabulary on one rank; "
                         "with tensor parallelism choose chunked or triton")
    logits = hidden @ weight.t()  # [N, V]
    return token_logprobs(logits, targets), (token_entropy(logits) if with_entropy else None)


def default_chunk_rows(vocab: int) -> int:
    """Rows per logits slice: about 64 MiB of fp32 logits per slice, between 64 and 4096 rows."""
    return max(64, min(4096, (1 << 24) // max(vocab, 1)))


class TorchSliceMath:
    """Per-slice statistics and gradient in plain torch (two [rows, V_local] temporaries)."""

    @staticmethod
    def stats(logits: torch.Tensor, local_targets: torch.Tensor, owned: torch.Tensor,
              with_entropy: bool = True) -> torch.Tensor:
        """logits [n, V] fp32 -> [4, n]: a row offset m, sum exp(z - m), target logit (0 if not
        on this rank), sum exp(z - m) * z (only `with_entropy`; else 0). Without the entropy,
        m is the row's logsumexp (one fused pass) and the sum is 1."""
        target = logits.gather(1, local_targets.clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)  # [n]
        target = torch.where(owned, target, torch.zeros_like(target))  # [n]
        if not with_entropy:
            lse = torch.logsumexp(logits, dim=-1)  # [n]
            return torch.stack([lse, torch.ones_like(lse), target, torch.zeros_like(lse)])  # [4, n]
        row_max = logits.max(dim=-1).values  # [n]
        exp = torch.exp(logits - row_max[:, None])  # [n, V]
        sum_exp_z = (exp[:, None, :] @ logits[:, :, None]).view(-1)  # [n] row-wise dot, no [n, V] temporary
        return torch.stack([row_max, exp.sum(-1), target, sum_exp_z])  # [4, n]

    @staticmethod
    def gradient_(logits: torch.Tensor, lse: torch.Tensor, mean_logit: torch.Tensor, local_targets: torch.Tensor,
                  owned: torch.Tensor, grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None) -> torch.Tensor:
        """Turn logits [n, V] fp32 into d(loss)/d(logits) in place:
        g_lp (onehot - p) - g_H p (z - E_p[z])."""
        logits_copy = logits if grad_entropy is None else logits.clone()  # [n, V]
        probs = logits.sub_(lse[:, None]).exp_()  # [n, V] now p
        if grad_entropy is not None:
            centered = logits_copy.sub_(mean_logit[:, None])  # [n, V]  z - E[z]
            grad = probs * (centered.mul_(-grad_entropy[:, None]).sub_(grad_logp[:, None]))  # [n, V]
            logits.copy_(grad)
        else:
            logits.mul_(-grad_logp[:, None])  # [n, V]
        rows = owned.nonzero().squeeze(1)  # [k]
        logits[rows, local_targets[rows]] += grad_logp[rows]
        return logits


def slice_logits(hidden: torch.Tensor, weight: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """hidden [n, H] @ weight [V, H]^T into the reused fp32 buffer's first n rows -> [n, V] fp32.
    Reusing one buffer per call avoids re-allocating (and, on CPU, page-faulting) a fresh
    [n, V] block for every slice."""
    out = buffer[: hidden.shape[0]]  # [n, V]
    if hidden.dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.mm(hidden, weight.t(), out=out)
    return out.copy_(hidden @ weight.t())


def vocab_offset(local_vocab: int, group: dist.ProcessGroup | None) -> int:
    """First vocabulary id of this rank's weight rows (ranks hold consecutive slices)."""
    if group is None:
        return 0
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([local_vocab], dtype=torch.int64), group=group)
    return int(sum(int(s) for s in sizes[: dist.get_rank(group)]))


def merge_stats(stats: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[4, N] per-rank statistics -> (lse [N], target logit [N], E_p[z] [N]) over the whole vocabulary."""
    row_max, sum_exp, target, sum_exp_z = stats
    if group is not None:
        global_max = row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        scale = torch.exp(row_max - global_max)  # [N]
        sums = torch.stack([sum_exp * scale, target, sum_exp_z * scale])  # [3, N]
        dist.all_reduce(sums, group=group)
        row_max, (sum_exp, target, sum_exp_z) = global_max, sums
    return row_max + torch.log(sum_exp), target, sum_exp_z / sum_exp


class _ChunkedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, with_entropy, group, chunk_rows, math):
        local_vocab = weight.shape[0]
        offset = vocab_offset(local_vocab, group)
        local_targets = targets - offset  # [N]
        owned = (local_targets >= 0) & (local_targets < local_vocab)  # [N]
        stats = torch.empty(4, hidden.shape[0], dtype=torch.float32, device=hidden.device)  # [4, N]
        buffer = torch.empty(min(chunk_rows, hidden.shape[0]), local_vocab, dtype=torch.float32,
                             device=hidden.device)  # [rows, V_local]
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = slice_logits(hidden[rows], weight, buffer)  # [n, V_local]
            stats[:, rows] = math.stats(logits, local_targets[rows], owned[rows], with_entropy)
        lse, target_logit, mean_logit = merge_stats(stats, group)
        ctx.save_for_backward(hidden, weight, local_targets, owned, lse, mean_logit)
        ctx.group, ctx.chunk_rows, ctx.math = group, chunk_rows, math
        logp = target_logit - lse  # [N]
        entropy = lse - mean_logit if with_entropy else None  # [N]
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, local_targets, owned, lse, mean_logit = ctx.saved_tensors
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.float()
        grad_entropy = None if grad_entropy is None else grad_entropy.float()
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # a frozen head (LoRA) skips its matmul
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # [N, H]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        buffer = torch.empty(min(ctx.chunk_rows, hidden.shape[0]), weight.shape[0], dtype=torch.float32,
                             device=hidden.device)  # [rows, V_local]
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            logits = slice_logits(hidden[rows], weight, buffer)  # [n, V_local]
            grad_logits = ctx.math.gradient_(logits, lse[rows], mean_logit[rows], local_targets[rows], owned[rows],
                                             grad_logp[rows], None if grad_entropy is None else grad_entropy[rows])
            grad_logits = grad_logits.to(weight.dtype)  # [n, V_local]
            if need_hidden:
                grad_hidden[rows] = grad_logits @ weight  # [n, H]
            if need_weight:
                if grad_logits.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.t(), hidden[rows].float())  # [V_local, H]
                else:  # bf16 / fp16: the matmul in that dtype, its slices summed in fp32 (upcast to fp32 it
                    # ran at fp32 matmul speed on a CPU: 55 ms of a 590 ms bf16 step at bench-20m)
                    grad_weight.add_(grad_logits.t() @ hidden[rows].to(grad_logits.dtype))  # [V_local, H]
        if ctx.group is not None and need_hidden:
            dist.all_reduce(grad_hidden, group=ctx.group)  # every rank's vocabulary slice contributes
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None, None, None, None, None)


def linear_logprobs_chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            with_entropy: bool = False, group: dist.ProcessGroup | None = None,
                            chunk_rows: int = 0, math=TorchSliceMath) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden [N, H], weight [V_local, H] (this rank's vocabulary rows when `group` is the
    tensor-parallel group), targets [N] global ids -> (log p [N] fp32, entropy [N] fp32 or None),
    never materializing more than [chunk_rows, V_local] logits."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_logprobs: hidden [N, H] and weight [V, H] expected, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_logprobs: targets must be [N]={hidden.shape[0]}, got {tuple(targets.shape)}")
    rows = chunk_rows or default_chunk_rows(weight.shape[0])
    return _ChunkedLinearLogprobs.apply(hidden, weight, targets.long(), with_entropy, group, rows, math)
