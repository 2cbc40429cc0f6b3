"""Run a function on N local CPU processes over gloo (the multi-process side of the parallel
parity tests): each rank gets RANK/WORLD_SIZE/MASTER_* like under torchrun. Also: free ports and
waiting for / stopping the servers some tests start."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_domain.rollout.server_process import free_port, stop_server, wait_for_server  # noqa: F401 (re-exported)


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


def bench_serve_levels(url: str, questions: list[str], tmp_path, max_tokens: int = 4) -> list[dict]:
    """tools/bench_serve.py against a running server at 1 and 2 clients (1.5 s each, greedy,
    `max_tokens` per answer, the given questions): its levels, after the checks every server
    must pass: requests completed without errors, usage-counted tokens, consistent timings."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    prompts = tmp_path / "bench_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    run = subprocess.run([sys.executable, "tools/bench_serve.py", "--url", url, "--concurrency", "1,2", "--duration",
                          "1.5", "--max-tokens", str(max_tokens), "--prompts", str(prompts)],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(run.stdout.strip().splitlines()[-1])
    assert [level["clients"] for level in record["levels"]] == [1, 2] and record["prompts"] == len(questions)
    assert record["torch"] and record["cpu"] and "amx_bf16" in record  # where it ran
    for level in record["levels"]:
        assert level["requests"] >= level["clients"] and level["errors"] == 0, level
        assert level["requests_per_s"] == level["requests"] / level["wall_s"]
        assert 0 < level["ttft_ms"]["p50"] <= level["latency_ms"]["p99"]
        assert level["itl_ms"]["p50"] > 0 and level["tpot_ms"]["p50"] > 0
    return record["levels"]
