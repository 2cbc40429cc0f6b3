"""`train.dtype: auto`: the training dtype this device runs fast. bf16 on CUDA devices that
support it and on CPUs with AMX or AVX-512 BF16 (measured on a Xeon with AMX: bf16 matmuls
~1.4 TFLOP/s vs ~0.35 fp32 on 2 threads; on an AMD EPYC with AVX-512 BF16 and no AMX, 0.34-0.44
vs 0.14-0.19 TFLOP/s, the demo's stages 625 vs 710 s); fp32 elsewhere (an AVX2-only CPU runs
bf16 matmuls ~35x slower than fp32)."""

from __future__ import annotations

import dataclasses

import torch

from megatron_domain.config import Config
from megatron_domain.metrics import cpu_capabilities


def fast_training_dtype(device: torch.device) -> tuple[str, str]:
    """("bf16" or "fp32", the reason) for `device`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return "bf16", f"{name} supports bf16"
        return "fp32", f"{name} does not support bf16"
    if device.type == "cpu":
        cpu = cpu_capabilities()
        fast = [flag for flag in ("amx_bf16", "avx512_bf16") if cpu[flag]]
        if fast:
            return "bf16", f"the CPU ({cpu['cpu']}) has {' and '.join(fast)}"
        return "fp32", (f"the CPU ({cpu['cpu']}) has neither AMX nor AVX-512 BF16, so bf16 matmuls would run "
                        "far slower than fp32")
    return "fp32", f"no bf16 rule for device type {device.type!r}"


def resolve_training_dtype(cfg: Config, device: torch.device) -> tuple[Config, str]:
    """(cfg with train.dtype resolved, the reason; "" when it was not `auto`). The Config is a
    copy: the caller's (a pipeline's stage config) keeps `auto`."""
    if cfg.train.dtype != "auto":
        return cfg, ""
    dtype, reason = fast_training_dtype(device)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, dtype=dtype)), f"train.dtype auto -> {dtype}: {reason}"


# oneDNN builds (JIT) a bf16 matmul kernel for every new row count: measured on a Xeon with AMX, 2
# threads, a [M, 128] x [128, 384] bf16 matmul took 1.1 ms on a new M and 0.35 ms on one seen
# before (fp32, through MKL: 0.29 ms either way). A row whose length changes every micro-batch
# (the DPO stage's one padding-free pair row) pays that on every matmul unless its length is
# rounded up to a few repeating values.
CPU_BF16_ROW_MULTIPLE = 64


def matmul_row_multiple(dtype: str, device: torch.device) -> int:
    """What a variable-length row is padded to a multiple of so its matmul shapes repeat:
    CPU_BF16_ROW_MULTIPLE for bf16 (`dtype`, resolved: not `auto`) on a CPU, 1 elsewhere (MKL's
    fp32 and cuBLAS's kernels cost nothing extra on a new shape). Measured on the demo's DPO
    stage in bf16 (AMX, 2 threads): 0.175 -> 0.123 s a training step (fp32: 0.127 s)."""
    return CPU_BF16_ROW_MULTIPLE if device.type == "cpu" and dtype == "bf16" else 1
