"""Training attention on the CPU in bf16: a fused flash forward (SDPA's where oneDNN offers bf16
brgemm, i.e. AMX; elsewhere ours, `csrc/cpu/attention_forward.cpp`), and the csrc attention
backward (`csrc/cpu/attention_backward.cpp`: the same math with its matmuls on AMX brgemm tiles,
or on AVX-512-BF16 dot products where oneDNN offers no bf16 brgemm, as on an AMD EPYC without
AMX) instead of torch's.

Why: torch 2.13's CPU flash-attention backward took 123 ms of a 700 ms bf16 training step
(bench-20m, 4 x 512, AMX), 5x its forward; ours takes 12.3-13.5 vs 20.5-21.3 ms per layer,
causal or with a document mask, with equal or smaller error against a float64 reference. On the
EPYC (AVX-512-BF16, no AMX) one thread: 10.8 ms vs torch's ~30 ms per layer (2 x 8 heads x 512 x
64), and bench-20m's bf16 step 1.11x -> 1.17x transformers'.

Both halves are torch custom ops (`megatron_domain::cpu_flash_attention` and its backward), so
a compiled decoder layer keeps them as single nodes. `cpu_attention_ready` decides once per
forward, outside any compiled region, whether they can run: a CPU, bf16 autocast or bf16
activations, gradients enabled, and the prebuilt extension (never a JIT build during a
forward) on a CPU with AVX-512-BF16. The attention then also needs a head dim that is a
multiple of 32. Everywhere else `F.scaled_dot_product_attention` runs as before.
"""

from __future__ import annotations

import functools

import torch


def cpu_attention_ready(x: torch.Tensor) -> bool:
    """Whether this forward's attention may use the csrc backward (see the module docstring);
    `x` is the forward's residual stream (fp32 under bf16 autocast)."""
    if x.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if not (autocast_bf16 or x.dtype == torch.bfloat16):
        return False
    return csrc_attention_available()


@functools.cache
def csrc_attention_available() -> bool:
    """Whether the prebuilt extension has the attention backward and this CPU runs it (asked
    once per process: every training forward needs the answer, and a missing extension would
    otherwise be looked up on disk each time)."""
    ext = _extension()
    probe = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16)
    return ext is not None and hasattr(ext, "attention_backward") and ext.attention_backward_supported(probe)


@functools.cache
def csrc_forward_runs() -> bool:
    """Whether the forward half runs the csrc kernel rather than SDPA's: on AVX-512-BF16 CPUs
    where oneDNN offers no bf16 brgemm (there torch's forward ran at a third of our kernel's
    rate: bench-20m layer 16 vs 10 ms on an AMD EPYC); with AMX, torch's forward already runs
    on brgemm and stays."""
    ext = _extension()
    return (ext is not None and hasattr(ext, "attention_forward")
            and ext.attention_backward_matmuls() == "avx512_bf16")


def runs_here(q: torch.Tensor) -> bool:
    """Whether the csrc backward takes this q (bf16, head dim a multiple of 32), once
    `cpu_attention_ready` said yes for the forward."""
    return q.dtype == torch.bfloat16 and q.shape[-1] % 32 == 0


def _extension():
    from megatron_domain.kernels.extension import prebuilt_extension

    return prebuilt_extension()


@torch.library.custom_op("megatron_domain::cpu_flash_attention", mutates_args=())
def cpu_flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention, restricted by the bool `mask` [B, 1, S, S] when given: q [B, Hq, S, D],
    k/v [B, Hkv, S, D] -> (out [B, Hq, S, D], log-sum-exp [B, Hq, S] fp32), by the kernel
    `csrc_forward_runs` picks for this CPU."""
    return flash_forward(q, k, v, mask, csrc=csrc_forward_runs())


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  csrc: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward half with either kernel (tests run both): `csrc` ours, else SDPA's CPU flash
    kernel; shapes as `cpu_flash_attention_forward`, both outputs with sequence-major memory."""
    if csrc:
        out, lse = _extension().attention_forward(q, k, v, mask, True, q.shape[-1] ** -0.5)
        return out, lse
    if mask is None:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    else:
        additive = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))  # [B, 1, S, S]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False,
                                                                             attn_mask=additive)
    # one fixed layout, [B, S, H, ...] in memory (the kernel's choice follows its inputs' strides;
    # a compiled region needs the fake's): no copy when the kernel already wrote it that way
    return sequence_major(out), sequence_major(lse)


def sequence_major(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, ...] with [B, S, H, ...] memory order (a copy only when it has another)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@cpu_flash_attention_forward.register_fake
def _forward_shapes(q, k, v, mask):
    bsz, heads, seq, _ = q.shape
    out = q.new_empty(bsz, seq, heads, q.shape[-1]).transpose(1, 2)  # [B, Hq, S, D], sequence-major
    lse = q.new_empty(bsz, seq, heads, dtype=torch.float32).transpose(1, 2)  # [B, Hq, S], sequence-major
    return out, lse


@torch.library.custom_op("megatron_domain::cpu_flash_attention_backward", mutates_args=())
def cpu_flash_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The csrc kernel: (grad_q [B, Hq, S, D], grad_k, grad_v [B, Hkv, S, D])."""
    grad_q, grad_k, grad_v = _extension().attention_backward(grad_out.to(q.dtype), q, k, v, out, lse, mask, True,
                                                             q.shape[-1] ** -0.5)
    return grad_q, grad_k, grad_v


@cpu_flash_attention_backward.register_fake
def _backward_shapes(grad_out, q, k, v, out, lse, mask):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, mask = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    grad_q, grad_k, grad_v = cpu_flash_attention_backward(grad_out, q, k, v, out, lse, mask)
    return grad_q, grad_k, grad_v, None


cpu_flash_attention_forward.register_autograd(_backward, setup_context=_setup_context)


def cpu_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
                        ) -> torch.Tensor:
    """Causal (and `mask` [B, 1, S, S] bool, when given) attention with the csrc backward:
    q [B, Hq, S, D], k/v [B, Hkv, S, D] -> [B, Hq, S, D]."""
    out, _ = cpu_flash_attention_forward(q, k, v, mask)
    return out
