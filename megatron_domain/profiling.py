"""torch.profiler summaries of training steps, for the benchmarks (`tools/bench.py --profile`,
`tools/gpu_check.py`): time per phase, the matmul share and the top ops by self time."""

from __future__ import annotations

import re
from contextlib import AbstractContextManager
from typing import Callable

import torch

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm")
# CUDA kernels that are matrix products (cuBLAS / cuBLASLt / CUTLASS / Triton matmul templates)
GEMM_KERNEL = re.compile(r"gemm|nvjet|cutlass|xmma|wgmma|triton_tem_fused_mm|scaled_mm", re.IGNORECASE)
PHASES = ("forward", "backward", "optimizer")


def profile_training_steps(forward_loss: Callable[[], torch.Tensor], optimizer_step: Callable[[], None], steps: int,
                           device: torch.device, top: int,
                           autocast: AbstractContextManager | None = None) -> tuple[dict, str]:
    """Run `steps` training steps (forward_loss() under `autocast`, backward, optimizer_step())
    under torch.profiler. Returns ({"phase_ms_per_step", "matmul_share", "top_ops", ...}, the
    profiler's table as text). Times are self CPU time on a CPU and self device time on CUDA,
    where the top ops are kernels and the matmul share counts the GEMM kernels by name."""
    from contextlib import nullcontext

    from torch.profiler import ProfilerActivity, profile, record_function

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function("forward"), autocast or nullcontext():
                loss = forward_loss()
            with record_function("backward"):
                loss.backward()
            with record_function("optimizer"):
                optimizer_step()
            if on_gpu:
                torch.cuda.synchronize()
    averages = prof.key_averages()

    def self_us(event) -> float:
        return event.self_device_time_total if on_gpu else event.self_cpu_time_total

    # on CUDA only the device's own events (kernels, copies): an aten op's self device time
    # repeats its kernels' time
    ops = [e for e in averages if e.key not in PHASES and self_us(e) > 0
           and (not on_gpu or e.device_type == torch.autograd.DeviceType.CUDA)]
    total = sum(self_us(e) for e in ops)
    is_matmul = (lambda key: bool(GEMM_KERNEL.search(key)) or key in MATMUL_OPS) if on_gpu else \
        (lambda key: key in MATMUL_OPS)
    phases = {e.key: e.cpu_time_total / 1e3 / steps for e in averages if e.key in PHASES}
    ranked = sorted(ops, key=self_us, reverse=True)[:top]
    table = averages.table(sort_by="self_cuda_time_total" if on_gpu else "self_cpu_time_total", row_limit=top)
    summary = {"steps": steps, "phase_ms_per_step": phases, "time": "device" if on_gpu else "cpu",
               "total_ms_per_step": total / 1e3 / steps,
               "matmul_share": sum(self_us(e) for e in ops if is_matmul(e.key)) / total if total else 0.0,
               "top_ops": [{"op": e.key[:120], "self_ms_per_step": self_us(e) / 1e3 / steps, "share": self_us(e) / total,
                            "calls_per_step": e.count / steps} for e in ranked]}
    return summary, table
