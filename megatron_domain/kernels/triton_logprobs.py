"""Triton versions of the per-slice math of `linear_logprobs` (the only importer of triton).

One program per row of a logits slice [n, V] (fp32, contiguous), walking the vocabulary in
BLOCK-wide tiles: `_stats_kernel` keeps an online max / sum of exp / sum of exp * z and picks
the target logit; `_gradient_kernel` overwrites the row with its gradient
g_lp (onehot - p) - g_H p (z - E_p[z]). The matmuls around them stay in torch.
Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how the tests run it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_domain.kernels.linear_logprobs import TorchSliceMath, linear_logprobs_chunked

BLOCK = 1024
NEG_BIG = tl.constexpr(-1.0e30)  # a global a kernel reads must be a tl.constexpr instance


@triton.jit
def _stats_kernel(logits_ptr, targets_ptr, owned_ptr, out_ptr, n_rows, vocab, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK)
    # a finite "minus infinity" keeps lanes that saw no column free of inf - inf = nan
    row_max = tl.full([BLOCK], NEG_BIG, tl.float32)
    sum_exp = tl.zeros([BLOCK], tl.float32)
    sum_exp_z = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        z = tl.load(base + cols, mask=cols < vocab, other=NEG_BIG)
        new_max = tl.maximum(row_max, z)
        scale = tl.exp(row_max - new_max)
        e = tl.where(cols < vocab, tl.exp(z - new_max), 0.0)
        sum_exp = sum_exp * scale + e
        sum_exp_z = sum_exp_z * scale + tl.where(cols < vocab, e * z, 0.0)
        row_max = new_max
    m = tl.max(row_max, axis=0)
    lane_scale = tl.exp(row_max - m)
    total = tl.sum(sum_exp * lane_scale, axis=0)
    total_z = tl.sum(sum_exp_z * lane_scale, axis=0)
    target = tl.load(targets_ptr + row)
    owned = tl.load(owned_ptr + row)
    target_logit = tl.load(base + tl.where(owned != 0, target, 0))
    tl.store(out_ptr + row, m)
    tl.store(out_ptr + n_rows + row, total)
    tl.store(out_ptr + 2 * n_rows + row, tl.where(owned != 0, target_logit, 0.0))
    tl.store(out_ptr + 3 * n_rows + row, total_z)


@triton.jit
def _gradient_kernel(logits_ptr, lse_ptr, mean_ptr, targets_ptr, owned_ptr, grad_logp_ptr, grad_entropy_ptr,
                     vocab, stride_row, HAS_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK)
    lse = tl.load(lse_ptr + row)
    g_lp = tl.load(grad_logp_ptr + row)
    target = tl.load(targets_ptr + row)
    owned = tl.load(owned_ptr + row)
    if HAS_ENTROPY:
        mean = tl.load(mean_ptr + row)
        g_h = tl.load(grad_entropy_ptr + row)
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        valid = cols < vocab
        z = tl.load(base + cols, mask=valid, other=0.0)
        p = tl.exp(z - lse)
        grad = -g_lp * p
        if HAS_ENTROPY:
            grad = grad - g_h * p * (z - mean)
        grad = tl.where((cols == target) & (owned != 0), grad + g_lp, grad)
        tl.store(base + cols, grad, mask=valid)


class TritonSliceMath(TorchSliceMath):
    """Drop-in for `linear_logprobs.TorchSliceMath` with the row loops in Triton (fp32 logits)."""

    @staticmethod
    def stats(logits: torch.Tensor, local_targets: torch.Tensor, owned: torch.Tensor,
              with_entropy: bool = True) -> torch.Tensor:
        """logits [n, V] fp32 -> [4, n] (max, sum exp, target logit, sum exp * z); one pass
        computes all four, so `with_entropy` changes nothing here."""
        logits = logits.contiguous()
        n_rows, vocab = logits.shape
        out = torch.empty(4, n_rows, dtype=torch.float32, device=logits.device)  # [4, n]
        if n_rows:
            _stats_kernel[(n_rows,)](logits, local_targets.contiguous(), owned.to(torch.int8).contiguous(), out,
                                     n_rows, vocab, logits.stride(0), BLOCK=min(BLOCK, triton.next_power_of_2(vocab)))
        return out

    @staticmethod
    def gradient_(logits: torch.Tensor, lse: torch.Tensor, mean_logit: torch.Tensor, local_targets: torch.Tensor,
                  owned: torch.Tensor, grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None) -> torch.Tensor:
        """Overwrite logits [n, V] fp32 (contiguous) with the gradient of the loss w.r.t. them."""
        n_rows, vocab = logits.shape
        if n_rows:
            has_entropy = grad_entropy is not None
            _gradient_kernel[(n_rows,)](logits, lse.contiguous(), mean_logit.contiguous(), local_targets.contiguous(),
                                        owned.to(torch.int8).contiguous(), grad_logp.contiguous(),
                                        grad_entropy.contiguous() if has_entropy else grad_logp, vocab,
                                        logits.stride(0), HAS_ENTROPY=has_entropy,
                                        BLOCK=min(BLOCK, triton.next_power_of_2(vocab)))
        return logits


def linear_logprobs_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           with_entropy: bool = False, group=None, chunk_rows: int = 0,
                           loss_weights: torch.Tensor | None = None):
    """`linear_logprobs_chunked` with the Triton slice kernels."""
    return linear_logprobs_chunked(hidden, weight, targets, with_entropy, group, chunk_rows, loss_weights,
                                   math=TritonSliceMath)
