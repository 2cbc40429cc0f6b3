"""The `linear_logprobs` op: hidden states [N, H] x output weight [V, H] + targets [N] ->
log p(target) per token (and optionally the entropy of each next-token distribution).

`linear_logprobs_reference` materializes the [N, V] logits. The chunked version walks over
blocks of rows so that only a [rows, V] slice of logits exists at a time, keeps three numbers
per token (max, sum of exp, target logit; plus sum p*z for the entropy) and recomputes each
slice in a custom backward. When the caller's loss is linear in the log-probs (a causal-LM
loss: minus their masked sum, times a scalar) and it says so by passing those weights
(`loss_weights`), the forward pass computes the gradients from the same slices and the backward
pass only scales them: one logits matmul fewer per step (Liger-Kernel's fused linear
cross-entropy does the same). When the vocabulary is split over tensor-parallel ranks (each rank
holds weight rows [offset, offset + V_local)), the per-token statistics are merged across the
group (max, then sums) and the hidden-state gradient is all-reduced.

The per-slice math (statistics of a logits slice, and the logits slice turned into its
gradient in place) is a small strategy object: `TorchSliceMath` here, `CppSliceMath` (the csrc
row kernels, on CPUs with AVX-512-BF16), a Triton version in `kernels/triton_logprobs.py`;
the matmuls stay in torch (cuBLAS / oneDNN) either way.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from megatron_domain.losses import token_entropy, token_logprobs


def linear_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              with_entropy: bool = False, group: dist.ProcessGroup | None = None,
                              chunk_rows: int = 0, loss_weights: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Full logits: hidden [N, H], weight [V, H], targets [N] -> (log p [N] fp32, entropy [N] fp32 or None).
    The whole vocabulary only (`group` must be None; `chunk_rows` and the `loss_weights` hint
    are ignored: autograd differentiates the logits)."""
    if group is not None:
        raise ValueError("kernels.linear_logprobs: the reference needs the whole vocabulary on one rank; "
                         "with tensor parallelism choose chunked or triton")
    logits = hidden @ weight.t()  # [N, V]
    return token_logprobs(logits, targets), (token_entropy(logits) if with_entropy else None)


def default_chunk_rows(vocab: int, device_type: str = "cuda") -> int:
    """Rows per logits slice. GPUs: about 256 MiB of fp32 logits per slice, between 256 and 8192
    rows: every slice adds its weight gradient into the whole [V, H] fp32 gradient, a pass over
    V x H x 8 bytes or more, so slices must be tall. (With 64 MiB, 130 rows at Llama 3's vocabulary,
    an H200 ran the 1B preset's step 40% slower than with full logits.) CPUs: about 16 MiB, at
    least 256 rows, so a slice is still in cache when its statistics and gradient are taken
    (bench-20m's bf16 cross-entropy, forward + backward: 84-88 ms at 256-512 rows, 110 ms at
    1024-2048, 135 ms at 64)."""
    if device_type == "cpu":
        return max(256, min(4096, (1 << 22) // max(vocab, 1)))
    return max(256, min(8192, (1 << 26) // max(vocab, 1)))


class TorchSliceMath:
    """Per-slice statistics and gradient in plain torch (two [rows, V_local] temporaries), on
    fp32 logits (`in_weight_dtype`: False; a bf16 matmul's logits are copied to fp32 first)."""

    in_weight_dtype = False

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

    @classmethod
    def stats_and_gradient_(cls, logits: torch.Tensor, local_targets: torch.Tensor, owned: torch.Tensor,
                            grad_logp: torch.Tensor) -> torch.Tensor:
        """[4, n] statistics (as `stats` without entropy) of logits [n, V] that hold the whole
        vocabulary, which are then turned in place into d(sum grad_logp * log p)/d(logits)."""
        stats = cls.stats(logits, local_targets, owned, with_entropy=False)  # [4, n]
        lse = stats[0] + torch.log(stats[1])  # [n]
        cls.gradient_(logits, lse, lse, local_targets, owned, grad_logp, None)
        return stats


class CppSliceMath(TorchSliceMath):
    """The slice math of `csrc/cpu/cross_entropy_rows.cpp` (CPUs with AVX-512-BF16): one
    pass over each row while it is in cache, on the logits in the weight's dtype (fp32, or bf16
    read and written as such). The entropy's gradient stays in torch (on fp32 logits): with
    `with_entropy` the chunked kernel keeps TorchSliceMath."""

    in_weight_dtype = True

    @staticmethod
    def stats(logits: torch.Tensor, local_targets: torch.Tensor, owned: torch.Tensor,
              with_entropy: bool = True) -> torch.Tensor:
        """logits [n, V] fp32 / bf16 -> [4, n]: row max, sum exp(z - max), target logit, sum exp * z."""
        return _extension().cross_entropy_rows(logits, column_targets(local_targets, owned), None)

    @staticmethod
    def gradient_(logits: torch.Tensor, lse: torch.Tensor, mean_logit: torch.Tensor, local_targets: torch.Tensor,
                  owned: torch.Tensor, grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None) -> torch.Tensor:
        """logits [n, V] -> g_lp (onehot - p) in place (no entropy term: see the class docstring)."""
        if grad_entropy is not None:
            raise ValueError("CppSliceMath: the entropy gradient needs TorchSliceMath (fp32 logits)")
        _extension().cross_entropy_rows_gradient_(logits, lse, column_targets(local_targets, owned), grad_logp)
        return logits

    @classmethod
    def stats_and_gradient_(cls, logits: torch.Tensor, local_targets: torch.Tensor, owned: torch.Tensor,
                            grad_logp: torch.Tensor) -> torch.Tensor:
        """Both in one pass per row (see TorchSliceMath.stats_and_gradient_)."""
        return _extension().cross_entropy_rows(logits, column_targets(local_targets, owned), grad_logp)


def column_targets(local_targets: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """[n] target columns for the csrc rows: the local id, or -1 where the target is not on this rank."""
    return torch.where(owned, local_targets, -1)


def _extension():
    from megatron_domain.kernels.extension import prebuilt_extension

    return prebuilt_extension()


@functools.cache
def cpp_slice_math_available() -> bool:
    """Whether the prebuilt extension has the cross-entropy row kernels and this CPU runs them
    (asked once per process)."""
    ext = _extension()
    return ext is not None and hasattr(ext, "cross_entropy_rows") and ext.cross_entropy_rows_supported()


def default_slice_math(device: torch.device, with_entropy: bool):
    """CppSliceMath on a CPU that runs it (without the entropy), else TorchSliceMath."""
    if device.type == "cpu" and not with_entropy and cpp_slice_math_available():
        return CppSliceMath
    return TorchSliceMath


class SliceBuffers:
    """The reused memory of one pass over the slices: for a bf16 / fp16 weight, a [rows, V]
    buffer in that dtype (the matmul's output, then the gradient handed to the next matmuls),
    and fp32 logits [rows, V] unless the slice math works in the weight's dtype. Fresh [rows, V]
    blocks per slice were measured 40 ms slower a bf16 step on a CPU (bench-20m), where each one
    is page-faulted anew."""

    def __init__(self, rows: int, weight: torch.Tensor, math):
        low_precision = weight.dtype != torch.float32
        self.logits = None if low_precision and math.in_weight_dtype else torch.empty(
            rows, weight.shape[0], dtype=torch.float32, device=weight.device)  # [rows, V]
        self.low = torch.empty(rows, weight.shape[0], dtype=weight.dtype, device=weight.device) \
            if low_precision else None  # [rows, V]
        self.weight_product = None  # [V, H] in the weight's dtype, made on first use
        self.csrc_accumulate = (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
                                and cpp_slice_math_available())
        # CUDA's bf16 / fp16 GEMM with an fp32 output (torch >= 2.8's addmm out_dtype)
        self.fp32_output_matmul = (weight.device.type == "cuda" and weight.dtype in (torch.bfloat16, torch.float16)
                                   and hasattr(torch.ops.aten.addmm, "dtype_out"))

    def slice_logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """hidden [n, H] @ weight [V, H]^T -> [n, V] logits in the buffers (fp32, or the
        weight's dtype when the math works in it)."""
        n = hidden.shape[0]
        if hidden.dtype != weight.dtype:
            return self.logits[:n].copy_(hidden @ weight.t())
        if self.low is None:
            return torch.mm(hidden, weight.t(), out=self.logits[:n])
        low = torch.mm(hidden, weight.t(), out=self.low[:n])  # [n, V]
        return low if self.logits is None else self.logits[:n].copy_(low)

    def accumulate_weight_gradient(self, grad_weight: torch.Tensor, grad_logits: torch.Tensor,
                                   hidden_rows: torch.Tensor) -> None:
        """grad_weight [V, H] fp32 += grad_logits [n, V]^T @ hidden_rows [n, H], the matmul in
        the gradient's (bf16 / fp16) dtype into a reused [V, H] block, summed in fp32 (upcast to
        fp32 the matmul ran at fp32 speed on a CPU: 55 ms of a 590 ms bf16 step at bench-20m; a
        fresh block per slice, and torch's type-promoting add_, cost ~9 ms each in page faults). On
        CUDA one GEMM with an fp32 output adds into the gradient instead (no [V, H] block)."""
        if self.fp32_output_matmul:  # one GEMM accumulating into the fp32 gradient, no [V, H] temporary
            torch.addmm(grad_weight, grad_logits.t(), hidden_rows.to(grad_logits.dtype), out_dtype=torch.float32,
                        out=grad_weight)  # [V, H]
            return
        if self.weight_product is None:
            self.weight_product = torch.empty(grad_weight.shape, dtype=grad_logits.dtype, device=grad_weight.device)
        product = torch.mm(grad_logits.t(), hidden_rows.to(grad_logits.dtype), out=self.weight_product)  # [V, H]
        if self.csrc_accumulate:
            _extension().accumulate_bf16_(grad_weight, product)
        else:
            grad_weight.add_(product)

    def in_weight_dtype(self, grad_logits: torch.Tensor) -> torch.Tensor:
        """The gradient [n, V] in the weight's dtype (a view of the reused buffer)."""
        if self.low is None or grad_logits.dtype == self.low.dtype:
            return grad_logits
        return self.low[: grad_logits.shape[0]].copy_(grad_logits)


def accumulate_slice_gradients(grad_logits: torch.Tensor, hidden_rows: torch.Tensor, weight: torch.Tensor,
                               grad_hidden_rows: torch.Tensor | None, grad_weight: torch.Tensor | None,
                               buffers: SliceBuffers) -> None:
    """One slice's share of the gradients from d(loss)/d(logits) [n, V]: grad_hidden_rows [n, H]
    = that @ weight and grad_weight [V, H] fp32 += its transpose @ hidden_rows [n, H] (either
    may be None: a frozen head or input skips its matmul)."""
    grad_logits = buffers.in_weight_dtype(grad_logits)  # [n, V]
    if grad_hidden_rows is not None:
        if grad_hidden_rows.dtype == weight.dtype:
            torch.mm(grad_logits, weight, out=grad_hidden_rows)  # [n, H]
        else:
            grad_hidden_rows.copy_(grad_logits @ weight)  # [n, H]
    if grad_weight is not None:
        if grad_logits.dtype == torch.float32:
            grad_weight.addmm_(grad_logits.t(), hidden_rows.float())  # [V, H]
        else:  # bf16 / fp16: the matmul in that dtype, its slices summed in fp32
            buffers.accumulate_weight_gradient(grad_weight, grad_logits, hidden_rows)  # [V, H]


def proportional_scale(grad: torch.Tensor, weights: torch.Tensor) -> float | None:
    """c with grad == c * weights (both [N]; to fp32 rounding, and exactly 0 where a weight is
    0), or None when the incoming gradient is not of that form."""
    if weights.numel() == 0:
        return 1.0
    anchor = int(weights.abs().argmax())
    if weights[anchor] == 0:
        return 0.0 if bool((grad == 0).all()) else None
    scale = grad[anchor] / weights[anchor]
    return float(scale) if torch.allclose(grad, scale * weights, rtol=1e-6, atol=0.0) else None


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
    def forward(ctx, hidden, weight, targets, with_entropy, group, chunk_rows, math, loss_weights, need_grads):
        local_vocab = weight.shape[0]
        offset = vocab_offset(local_vocab, group)
        local_targets = targets - offset  # [N]
        owned = (local_targets >= 0) & (local_targets < local_vocab)  # [N]
        stats = torch.empty(4, hidden.shape[0], dtype=torch.float32, device=hidden.device)  # [4, N]
        buffers = SliceBuffers(min(chunk_rows, hidden.shape[0]), weight, math)
        # gradients for grad_logp = loss_weights, from the forward's own slices (one vocabulary
        # on this rank, so each slice's logsumexp is final; see the module docstring)
        need_hidden, need_weight = need_grads
        eager = loss_weights is not None and group is None and not with_entropy and (need_hidden or need_weight)
        grad_hidden = torch.empty_like(hidden) if eager and need_hidden else None  # [N, H]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if eager and need_weight else None  # [V, H]
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = buffers.slice_logits(hidden[rows], weight)  # [n, V_local]
            if eager:  # logits -> their gradient for grad_logp = loss_weights
                stats[:, rows] = math.stats_and_gradient_(logits, local_targets[rows], owned[rows],
                                                          loss_weights[rows].float())
                accumulate_slice_gradients(logits, hidden[rows], weight,
                                           None if grad_hidden is None else grad_hidden[rows], grad_weight, buffers)
            else:
                stats[:, rows] = math.stats(logits, local_targets[rows], owned[rows], with_entropy)
        lse, target_logit, mean_logit = merge_stats(stats, group)
        ctx.save_for_backward(hidden, weight, local_targets, owned, lse, mean_logit)
        ctx.group, ctx.chunk_rows, ctx.math = group, chunk_rows, math
        ctx.eager = (loss_weights.float(), grad_hidden,
                     None if grad_weight is None else grad_weight.to(weight.dtype)) if eager else None
        logp = target_logit - lse  # [N]
        entropy = lse - mean_logit if with_entropy else None  # [N]
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, local_targets, owned, lse, mean_logit = ctx.saved_tensors
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.float()
        grad_entropy = None if grad_entropy is None else grad_entropy.float()
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # a frozen head (LoRA) skips its matmul
        if ctx.eager is not None:
            loss_weights, grad_hidden, grad_weight = ctx.eager
            ctx.eager = None  # a second backward (retain_graph) recomputes
            scale = proportional_scale(grad_logp, loss_weights) if grad_entropy is None else None
            if scale is not None:  # the loss was what the caller said: scale the forward's gradients
                if scale != 1.0:  # (1.0: a loss summed over the batch, as the engine's)
                    grad_hidden = None if grad_hidden is None else grad_hidden.mul_(scale)
                    grad_weight = None if grad_weight is None else grad_weight.mul_(scale)
                return (grad_hidden, grad_weight, *[None] * 7)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # [N, H]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        buffers = SliceBuffers(min(ctx.chunk_rows, hidden.shape[0]), weight, ctx.math)
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            logits = buffers.slice_logits(hidden[rows], weight)  # [n, V_local]
            grad_logits = ctx.math.gradient_(logits, lse[rows], mean_logit[rows], local_targets[rows], owned[rows],
                                             grad_logp[rows], None if grad_entropy is None else grad_entropy[rows])
            accumulate_slice_gradients(grad_logits, hidden[rows], weight, grad_hidden[rows] if need_hidden else None,
                                       grad_weight, buffers)
        if ctx.group is not None and need_hidden:
            dist.all_reduce(grad_hidden, group=ctx.group)  # every rank's vocabulary slice contributes
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), *[None] * 7)


def linear_logprobs_chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            with_entropy: bool = False, group: dist.ProcessGroup | None = None,
                            chunk_rows: int = 0, loss_weights: torch.Tensor | None = None,
                            math=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden [N, H], weight [V_local, H] (this rank's vocabulary rows when `group` is the
    tensor-parallel group), targets [N] global ids -> (log p [N] fp32, entropy [N] fp32 or None),
    never materializing more than [chunk_rows, V_local] logits.

    `loss_weights` [N] (optional) says the caller's loss is c * sum(loss_weights * log p) for a
    scalar c (a causal-LM loss: weights = minus the loss mask). With gradients enabled, one
    vocabulary shard (`group` None) and no entropy, the gradients are then computed in the
    forward pass and backward only multiplies them by c. Should the incoming gradient not be
    proportional to the weights after all, backward recomputes as without the hint.

    `math`: the per-slice statistics and gradient (TorchSliceMath, CppSliceMath, TritonSliceMath);
    None picks CppSliceMath on a CPU that runs it, else TorchSliceMath."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_logprobs: hidden [N, H] and weight [V, H] expected, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_logprobs: targets must be [N]={hidden.shape[0]}, got {tuple(targets.shape)}")
    if loss_weights is not None and loss_weights.shape != targets.shape:
        raise ValueError(f"linear_logprobs: loss_weights must be [N]={hidden.shape[0]}, got {tuple(loss_weights.shape)}")
    rows = chunk_rows or default_chunk_rows(weight.shape[0], hidden.device.type)
    math = math or default_slice_math(hidden.device, with_entropy)
    grad_enabled = torch.is_grad_enabled()  # (inside forward it is always off)
    need_grads = (grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad)
    return _ChunkedLinearLogprobs.apply(hidden, weight, targets.long(), with_entropy, group, rows, math,
                                        loss_weights, need_grads)
