"""Throughput, MFU and the per-step metrics log (`metrics.jsonl`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (FLOP/s) per GPU, from the vendors' data sheets.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def measured_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024,
                          repeats: int = 5, min_seconds: float = 0.0) -> float:
    """Best observed FLOP/s of a square matmul: the MFU denominator where no data sheet applies.
    One untimed call first (thread pool start-up, first touch of the output), then at least
    `repeats` timed calls and as many more as fit in `min_seconds`. On a shared 2-vCPU machine
    a best of five measured 95-197 GFLOP/s (fp32) in five fresh processes: a denominator that
    low put MFU above 1. Draws from a private generator: a resumed run must not consume the
    restored training RNG."""
    private = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=private)  # [size, size]
    b = torch.randn(size, size, device=device, dtype=dtype, generator=private)  # [size, size]
    a @ b  # warm-up, untimed
    best, calls, began = float("inf"), 0, time.perf_counter()
    while calls < repeats or time.perf_counter() - began < min_seconds:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best, calls = min(best, time.perf_counter() - start), calls + 1
    return 2 * size**3 / best


def peak_flops(device: torch.device, configured_tflops: float = 0.0, dtype: torch.dtype = torch.float32,
               min_seconds: float = 0.0) -> float:
    """Peak FLOP/s for MFU: the configured value, a GPU's data-sheet bf16 peak, else the
    measured matmul rate of this device in the training dtype `dtype` (CPU; bf16 and fp32
    differ 2-4x there), timed for at least `min_seconds` (measured_matmul_flops)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
    return measured_matmul_flops(device, dtype, min_seconds=min_seconds)


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """The first CPU's model name and feature flags from /proc/cpuinfo (("unknown", set())
    where there is none: not Linux)."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux
        pass
    return model, flags


def cpu_capabilities() -> dict:
    """The CPU a benchmark ran on: model name, logical cores, torch threads and the vector /
    matrix extensions that decide fp32 vs bf16 speed (AVX2, AVX-512, AVX-512 BF16, AMX)."""
    model, flags = cpu_model_and_flags()
    info = {"cpu": model, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"):
        info[name] = name in flags
    return info


def machine_record(device: torch.device | str = "cpu") -> dict:
    """What every benchmark JSON line records about where it ran: torch's version, the CPU
    (model, cores, threads, AVX2 / AVX-512 / AMX flags) and, on CUDA, the GPU's name."""
    record = {"torch": torch.__version__, **cpu_capabilities()}
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        record["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return record


def emit_json_line(record: dict, out: str = "") -> None:
    """A benchmark's result: one JSON line on stdout and, with `out`, appended to that file."""
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as handle:
            handle.write(line + "\n")


class MetricsLog:
    """Appends one JSON object per line to `<run_dir>/metrics.jsonl` (rank 0 only), and hands
    the same record to `trackers` (tracking.Trackers: TensorBoard, W&B) when given."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, trackers=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.trackers = trackers

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines for steps > `step` (written after the checkpoint we resume from)."""
        if not (self.enabled and self.path.is_file()):
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", -1) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        """Append one record."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(record)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """All records of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
