"""The op table: every kernel op by name, its implementations, and how one is chosen.

    op               reference        faster implementations
    pack_metadata    pure torch       cpp (csrc, CPU tensors), cuda (csrc, GPU tensors)
    linear_logprobs  full logits      chunked (torch, custom backward), triton (GPU / interpreter)
    dpo_loss         pure torch       cpp (csrc, CPU tensors), cuda (csrc, GPU tensors)

`kernels.<op>` in the config picks one; `auto` takes the fastest one that is ready on the
device without compiling anything: the prebuilt csrc extension (never a JIT build), Triton
on CUDA when installed, the chunked logprobs everywhere else. Choosing an implementation
explicitly that cannot run names what is missing and the config key.

Attention's backward is not in this table: the model's `sdpa` backend takes the csrc CPU
backward by itself where it runs (bf16 training on a CPU with AMX / AVX-512-BF16, prebuilt
extension; kernels/cpu_attention.py) and torch's everywhere else.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable

import torch

from megatron_domain.config import KERNEL_IMPLEMENTATIONS

# op -> backend -> "module:function" (imported only when chosen)
KERNEL_TABLE = {
    "pack_metadata": {
        "reference": "megatron_domain.kernels.pack:pack_metadata_reference",
        "cpp": "megatron_domain.kernels.pack:pack_metadata_extension",
        "cuda": "megatron_domain.kernels.pack:pack_metadata_extension",
    },
    "linear_logprobs": {
        "reference": "megatron_domain.kernels.linear_logprobs:linear_logprobs_reference",
        "chunked": "megatron_domain.kernels.linear_logprobs:linear_logprobs_chunked",
        "triton": "megatron_domain.kernels.triton_logprobs:linear_logprobs_triton",
    },
    "dpo_loss": {
        "reference": "megatron_domain.kernels.dpo:dpo_loss_reference",
        "cpp": "megatron_domain.kernels.dpo:dpo_loss_fused",
        "cuda": "megatron_domain.kernels.dpo:dpo_loss_fused",
    },
}


assert {op: tuple(impls) for op, impls in KERNEL_TABLE.items()} == KERNEL_IMPLEMENTATIONS, \
    "config.KERNEL_IMPLEMENTATIONS and kernels.registry.KERNEL_TABLE must list the same implementations"


def backend_problem(op: str, backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run `op` on `device` (None when it can). May JIT-build the csrc
    extension for cpp/cuda if it is not prebuilt."""
    key = f"kernels.{op}"
    if op not in KERNEL_TABLE:
        return f"unknown kernel op {op!r}; ops: {', '.join(KERNEL_TABLE)}"
    if backend not in KERNEL_TABLE[op]:
        return f"{key}: {backend!r} is not an implementation of {op}; choose auto or one of {', '.join(KERNEL_TABLE[op])}"
    if backend == "cpp" and device.type != "cpu":
        return f"{key}: 'cpp' runs on CPU tensors; on {device.type} choose 'cuda' or 'reference'"
    if backend == "cuda":
        if device.type != "cuda":
            return f"{key}: 'cuda' needs CUDA tensors (device is {device.type}); choose 'cpp' or 'reference'"
        from megatron_domain.kernels.extension import cuda_buildable, prebuilt_extension

        prebuilt = prebuilt_extension()
        if not (prebuilt is not None and prebuilt.has_cuda()) and not cuda_buildable():
            return (f"{key}: the csrc extension has no CUDA kernels and cannot be built here (needs a CUDA torch and "
                    "nvcc); rebuild with `pip install -e . --no-build-isolation` on the GPU machine or choose 'reference'")
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return f"{key}: 'triton' needs the triton package (pip install triton); or choose 'chunked'"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return f"{key}: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU debugging); choose 'chunked'"
    return None


def auto_backend(op: str, device: torch.device) -> str:
    """The fastest implementation of `op` ready on `device` without compiling anything."""
    if op == "linear_logprobs":
        if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
            return "triton"
        return "chunked"
    from megatron_domain.kernels.extension import prebuilt_extension

    prebuilt = prebuilt_extension()
    if prebuilt is not None:
        if device.type == "cuda" and prebuilt.has_cuda():
            return "cuda"
        if device.type == "cpu":
            return "cpp"
    return "reference"


def get_kernel(op: str, backend: str = "auto", device: torch.device | str = "cpu") -> Callable:
    """The function implementing `op` with `backend` (or `auto`) for tensors on `device`;
    raises ValueError naming the config key when it cannot run there."""
    device = torch.device(device)
    if backend == "auto" and op in KERNEL_TABLE:
        backend = auto_backend(op, device)
    problem = backend_problem(op, backend, device)
    if problem:
        raise ValueError(problem)
    module, name = KERNEL_TABLE[op][backend].split(":")
    return getattr(importlib.import_module(module), name)
