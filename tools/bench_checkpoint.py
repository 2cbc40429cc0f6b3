"""Does writing a checkpoint slow the rest of the process down? One JSON line.

    python tools/bench_checkpoint.py

In one process (a gloo group of one, as the engine runs on CPU): times an fp32 matmul of the
demo's decode shape ([512, 128] x [128, 384]) before and after `save_checkpoint` of a
24-layer model (~3.5M parameters) with its AdamW state, and after a `dcp.save` of it through
the process group (what `save_checkpoint` did before it used `no_dist` for one process; a
two-layer model did not show the effect). Measured on torch 2.13 CPU:
through the group every later op ran ~1.5x slower (135 -> 200 us for this matmul), which made
each pipeline stage after the first slower (a DPO round's sampling 1.5 -> 4.0 s).
"""

from __future__ import annotations

import json
import tempfile
import time

import torch
import torch.distributed.checkpoint as dcp

from megatron_domain.checkpoint import save_checkpoint
from megatron_domain.metrics import cpu_capabilities
from megatron_domain.parallel.distributed import ensure_process_group


def matmul_us(repeats: int = 2000) -> float:
    """Mean microseconds of a [512, 128] x [128, 384] fp32 matmul (after a warm-up)."""
    a = torch.randn(512, 128)  # [512, 128]
    b = torch.randn(128, 384)  # [128, 384]
    for _ in range(50):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    """Print the matmul time before and after each kind of save."""
    ensure_process_group(torch.device("cpu"))
    model = torch.nn.Sequential(*[torch.nn.Linear(384, 384) for _ in range(24)])  # ~3.5M parameters, 48 tensors
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
    model(torch.randn(64, 384)).sum().backward()
    optimizer.step()
    result = {"bench": "checkpoint_slowdown", **cpu_capabilities(), "torch": torch.__version__,
              "threads": torch.get_num_threads(),
              "matmul_us_fresh": matmul_us()}
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, 1, [model], [optimizer], {})
        result["matmul_us_after_save_checkpoint"] = matmul_us()
        dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=f"{tmp}/through_group")
        result["matmul_us_after_dcp_save_through_group"] = matmul_us()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
