#!/usr/bin/env python
"""Latency under load of a served model: requests/s, time to first token (TTFT), inter-token
latency (ITL) and end-to-end latency percentiles at 1, 4 and 16 concurrent clients against an
OpenAI-compatible server. Prints one JSON line (also written to --out).

    python tools/bench_serve.py runs/demo/sft                       # starts `mdt serve` on the run
    python tools/bench_serve.py exported/ --server vllm             # vLLM's OpenAI server on an HF folder
    python tools/bench_serve.py --url http://127.0.0.1:8000         # a server already running
    python tools/bench_serve.py runs/demo/sft --concurrency 1,4 --duration 10 --max-tokens 32

Each level runs closed-loop clients (each sends its next streaming chat request when the last
one finished) for `--duration` seconds: after that no client starts a new request and the
level ends when the in-flight ones finish (each bounded by `--request-timeout`), so a run takes
at most levels x (duration + request timeout) plus the server's start. Per request: TTFT = the
first content chunk's arrival - the send time; ITL = the gaps between content chunks
(servers may put several tokens in one chunk: `tokens_per_chunk` says how many on average);
TPOT = (last chunk - first chunk) / (output tokens - 1). Output tokens come from the stream's
`usage` (stream_options.include_usage, which both servers honour). Requests/s = completed
requests / the level's wall time. Prompts: `--prompts` JSONL ({"prompt": text} or
{"messages": [...]}, e.g. the demo's sft_heldout.jsonl), else built-in questions; temperature 0,
so both servers do the same work for the same prompt. `mdt serve` decodes one request at a
time (the sampler batches only within a request), so its TTFT grows with the queue; vLLM
batches requests continuously.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

QUESTIONS = ["What does the with statement do?", "Explain the assert statement.", "What is a generator?",
             "How do exceptions propagate?", "What does the global statement do?", "Describe slicing.",
             "What is a decorator?", "What does yield do?"]


def percentiles(values: list[float], scale: float = 1000.0) -> dict:
    """p50 / p90 / p99 / mean of `values` x scale (ms by default); nulls when there are none."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def at(q: float) -> float:  # nearest-rank percentile
        return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))] * scale
    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "mean": statistics.fmean(ordered) * scale}


def read_prompts(path: str | None) -> list[list[dict]]:
    """Chat message lists: one user turn per {"prompt"} record or the record's "messages"."""
    if not path:
        return [[{"role": "user", "content": q}] for q in QUESTIONS]
    prompts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if isinstance(record, dict) and isinstance(record.get("messages"), list):
            prompts.append([m for m in record["messages"] if m.get("role") != "assistant"] or record["messages"])
        elif isinstance(record, dict) and isinstance(record.get("prompt"), str):
            prompts.append([{"role": "user", "content": record["prompt"]}])
        else:
            raise ValueError(f"{path}:{number}: expected {{\"prompt\": text}} or {{\"messages\": [...]}}")
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


async def one_request(client, url: str, model: str, messages: list[dict], max_tokens: int, timeout: float) -> dict:
    """Send one streaming chat request; returns its timings (seconds) and output token count."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    arrivals, tokens = [], None
    async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            if "error" in payload:
                raise RuntimeError(f"server error: {payload['error']}")
            if payload.get("usage"):
                tokens = payload["usage"]["completion_tokens"]
            for choice in payload.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    arrivals.append(time.perf_counter())
    done = time.perf_counter()
    if not arrivals:
        return {"latency": done - sent, "ttft": None, "gaps": [], "tokens": tokens or 0, "chunks": 0}
    return {"latency": done - sent, "ttft": arrivals[0] - sent, "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])],
            "tokens": tokens if tokens is not None else len(arrivals), "chunks": len(arrivals),
            "decode": arrivals[-1] - arrivals[0]}


async def run_level(url: str, model: str, prompts: list[list[dict]], clients: int, duration: float,
                    max_tokens: int, request_timeout: float) -> dict:
    """`clients` closed-loop clients for `duration` seconds; the level's latency statistics."""
    import httpx

    records, errors = [], []
    deadline = time.perf_counter() + duration

    async def client_loop(index: int, client) -> None:
        k = index
        while time.perf_counter() < deadline:
            try:
                records.append(await one_request(client, url, model, prompts[k % len(prompts)], max_tokens,
                                                 request_timeout))
            except (httpx.HTTPError, RuntimeError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            k += clients

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in records)
    tpot = [r["decode"] / (r["tokens"] - 1) for r in records if r.get("decode") and r["tokens"] > 1]
    return {"clients": clients, "requests": len(records), "errors": len(errors), "first_error": errors[0] if errors else None,
            "wall_s": wall, "requests_per_s": len(records) / wall, "output_tokens_per_s": tokens / wall,
            "mean_output_tokens": tokens / len(records) if records else 0.0,
            "tokens_per_chunk": tokens / max(1, sum(r["chunks"] for r in records)),
            "ttft_ms": percentiles([r["ttft"] for r in records if r["ttft"] is not None]),
            "itl_ms": percentiles([g for r in records for g in r["gaps"]]),
            "tpot_ms": percentiles(tpot), "latency_ms": percentiles([r["latency"] for r in records])}


async def warm_up(url: str, model: str, messages: list[dict], timeout: float) -> None:
    """One short request before timing (first-call allocations, lazy initialisation)."""
    import httpx

    async with httpx.AsyncClient() as client:
        await one_request(client, url, model, messages, 4, timeout)


def start_server(args, log_path: Path) -> tuple[subprocess.Popen, str]:
    """`mdt serve` on a checkpoint / run, or vLLM's OpenAI server on an HF folder; waits for /health."""
    from megatron_domain.rollout.server_process import free_port, wait_for_server

    port = free_port()
    if args.server == "mdt":
        argv = [sys.executable, "-m", "megatron_domain.cli", "serve", args.target, "--port", str(port),
                "--model-name", "bench", "--device", args.device]
    else:
        if not (Path(args.target) / "config.json").is_file():
            raise SystemExit(f"{args.target}: --server vllm serves a Hugging Face folder (config.json + weights); "
                             "export one with `mdt convert mdt-to-hf RUN OUT`")
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.target,
                "--served-model-name", "bench", "--port", str(port), "--dtype", args.vllm_dtype,
                "--max-model-len", str(args.max_model_len), "--seed", "0"]
        if args.device == "cpu":  # vLLM's CPU backend otherwise reserves 92% of RAM for its KV cache
            argv += ["--enforce-eager", "--kv-cache-memory-bytes", str(int(args.vllm_kv_cache_gb * 2**30))]
    handle = log_path.open("w")
    proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    wait_for_server(proc, url, args.server_timeout, lambda: server_log_summary(log_path))
    return proc, url


def server_log_summary(path: Path) -> str:
    """The log's lines naming an error (vLLM prints the root cause long before the end), then its tail."""
    text = path.read_text()
    errors = [line for line in text.splitlines() if "Error:" in line and "File " not in line][:5]
    return "\n".join(errors + ["...", text[-2000:]])


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, start (or reach) the server, run every concurrency level, print JSON."""
    from megatron_domain.metrics import emit_json_line, machine_record

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", nargs="?", help="checkpoint or run (mdt serve) or HF folder (--server vllm)")
    parser.add_argument("--server", choices=["mdt", "vllm"], default="mdt")
    parser.add_argument("--url", default="", help="an OpenAI-compatible server already running (no target)")
    parser.add_argument("--model", default="", help="the model id to ask --url for (default: its first model)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds each level issues requests")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--prompts", default=None, help="JSONL of {\"prompt\"} or {\"messages\"} records")
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--server-timeout", type=float, default=300.0, help="seconds to wait for the server's start")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--vllm-dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--vllm-kv-cache-gb", type=float, default=1.0, help="vLLM on CPU: KV-cache memory")
    parser.add_argument("--out", default="", help="also append the JSON line to this file")
    args = parser.parse_args(argv)
    if bool(args.url) == bool(args.target):
        parser.error("give a target to serve, or --url of a running server (not both)")
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1:
        parser.error(f"--concurrency {args.concurrency!r}: positive client counts, e.g. 1,4,16")
    prompts = read_prompts(args.prompts)
    proc, url, model, started = None, args.url.rstrip("/"), args.model, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        try:
            if not url:
                proc, url = start_server(args, Path(tmp) / "server.log")
                model = "bench"
            startup = time.perf_counter() - started
            if not model:
                import httpx

                model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
            asyncio.run(warm_up(url, model, prompts[0], args.request_timeout))
            results = [asyncio.run(run_level(url, model, prompts, c, args.duration, args.max_tokens,
                                             args.request_timeout)) for c in levels]
        finally:
            if proc is not None:
                from megatron_domain.rollout.server_process import stop_server

                stop_server(proc)
    record = {"bench": "serve", "server": "url" if args.url else args.server, "target": args.target or args.url,
              "device": args.device, "max_tokens": args.max_tokens, "duration_s": args.duration,
              "prompts": len(prompts), "server_start_s": startup, "levels": results, **machine_record(args.device),
              "date": time.strftime("%Y-%m-%d")}
    emit_json_line(record, args.out)
    return record


if __name__ == "__main__":
    main()
