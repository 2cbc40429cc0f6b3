"""Process-group setup. Under torchrun the environment names the rendezvous; a plain single
process gets a world of one over an in-memory store (megatron-core's dataset builders and
DCP expect an initialized default group)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; asking for CUDA without one is an error. On
    CUDA each process takes the GPU of its LOCAL_RANK (set by torchrun) and makes it current."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                               "start at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def ensure_process_group(device: torch.device) -> None:
    """Initialize the default group once: NCCL on CUDA, gloo on CPU."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend=backend)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """World size (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1
