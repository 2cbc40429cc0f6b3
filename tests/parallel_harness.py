"""Run a function on N local CPU processes over gloo (the multi-process side of the parallel
parity tests): each rank gets RANK/WORLD_SIZE/MASTER_* like under torchrun. Also: free ports and
waiting for / stopping the servers some tests start."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """An unused TCP port on localhost."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args: tuple) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_on_ranks(world_size: int, fn, *args) -> None:
    """Call fn(rank, *args) on `world_size` fresh processes; re-raises a rank's failure."""
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)


def wait_for_server(proc, url: str, timeout_s: float, describe) -> None:
    """Poll `url`/health until it answers 200; `describe()` (e.g. the server's log) goes into the
    error when the process exits or the time runs out."""
    import time

    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{describe()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server did not answer within {timeout_s:.0f} s:\n{describe()}")


def stop_server(proc, timeout_s: float = 60) -> None:
    """Terminate a server process (kill it if it lingers)."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
