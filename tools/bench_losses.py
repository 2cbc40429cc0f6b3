#!/usr/bin/env python
"""Peak memory and time of the fused loss path vs the naive one, forward + backward:

    naive:  logits = h @ W^T  [N, V]  ->  log_softmax + gather  ->  DPO loss (reference)
    fused:  linear_logprobs (chunked / Triton: never more than a [rows, V] slice of logits)
            ->  dpo_loss (csrc kernels when built, else reference)

    python tools/bench_losses.py                          # CPU: N=2048, H=256, fp32
    python tools/bench_losses.py --tokens 8192 --hidden 4096 --dtype bf16    # a GPU

Each (path, vocabulary) runs in its own subprocess so peak memory is its own: on CUDA the
allocator's peak above the inputs, on CPU the growth of the peak RSS above the inputs. One
JSON line: per vocabulary size, both paths and the ratios (target: fused peak <= 1/4 of the
naive one at equal or better speed).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_bytes(device: torch.device) -> int:
    """Peak allocator bytes (CUDA) or peak RSS bytes (CPU) so far."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def dpo_segments(tokens: int, pairs: int, device: torch.device) -> torch.Tensor:
    """segment_ids [N]: each pair's chosen then rejected response, a short prompt before each."""
    per_pair = tokens // pairs
    ids = torch.full((tokens,), -1, dtype=torch.long)
    for p in range(pairs):
        start = p * per_pair
        quarter = per_pair // 4
        ids[start + quarter: start + 2 * quarter] = 2 * p
        ids[start + 3 * quarter: start + per_pair] = 2 * p + 1
    return ids.to(device)


def run_path(path: str, vocab: int, args) -> dict:
    """Forward + backward of one path; returns seconds per iteration and the peak memory above the inputs."""
    from megatron_domain.kernels.registry import get_kernel
    from megatron_domain.kernels.dpo import dpo_loss_reference
    from megatron_domain.kernels.linear_logprobs import linear_logprobs_reference

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, args.hidden, generator=gen) / args.hidden ** 0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, vocab, (args.tokens,), generator=gen).to(device)
    reference_logps = (-torch.rand(args.tokens, generator=gen) * 5).to(device)
    segments = dpo_segments(args.tokens, args.pairs, device)
    if path == "naive":
        logprobs, dpo = linear_logprobs_reference, dpo_loss_reference
    else:
        logprobs = get_kernel("linear_logprobs", args.logprobs_backend, device)
        dpo = get_kernel("dpo_loss", args.dpo_backend, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = peak_bytes(device)
    times = []
    for i in range(args.warmup + args.iters):
        start = time.perf_counter()
        logp, _ = logprobs(hidden, weight, targets)
        loss = dpo(logp, reference_logps, segments, args.pairs).loss
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        hidden.grad = weight.grad = None
    return {"time_s": sum(times) / len(times), "peak_gb": (peak_bytes(device) - baseline) / 2**30,
            "loss": float(loss)}


def main() -> None:
    """Parse arguments; run each (path, vocabulary) in its own process; print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--tokens", type=int, default=8192 if cuda else 2048)
    parser.add_argument("--hidden", type=int, default=4096 if cuda else 256)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--dtype", default="bf16" if cuda else "fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--logprobs-backend", default="auto", help="kernels.linear_logprobs choice for the fused path")
    parser.add_argument("--dpo-backend", default="auto", help="kernels.dpo_loss choice for the fused path")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--worker", nargs=2, metavar=("PATH", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_path(args.worker[0], int(args.worker[1]), args)))
        return
    passthrough = [a for a in sys.argv[1:]]
    from megatron_domain.metrics import machine_record

    results = {"bench": "losses", **machine_record(args.device), "tokens": args.tokens, "hidden": args.hidden,
               "dtype": args.dtype, "device": args.device,
               "pairs": args.pairs, "vocab": {}}
    for vocab in args.vocab:
        row = {}
        for path in ("naive", "fused"):
            proc = subprocess.run([sys.executable, __file__, *passthrough, "--worker", path, str(vocab)],
                                  capture_output=True, text=True)
            if proc.returncode:
                row[path] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
                continue
            row[path] = json.loads(proc.stdout.strip().splitlines()[-1])
        if "error" not in row["naive"] and "error" not in row["fused"]:
            row["memory_ratio"] = row["fused"]["peak_gb"] / max(row["naive"]["peak_gb"], 1e-9)
            row["speedup"] = row["naive"]["time_s"] / row["fused"]["time_s"]
            row["loss_diff"] = abs(row["naive"]["loss"] - row["fused"]["loss"])
        results["vocab"][str(vocab)] = row
    print(json.dumps(results))


if __name__ == "__main__":
    main()
