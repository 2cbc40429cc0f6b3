#!/usr/bin/env python
"""The one GPU check: build the csrc CUDA extension, compare every GPU implementation with
its reference, compare FP8 with bf16, time each attention kernel (SDPA's flash / cuDNN /
memory-efficient, the engine's sdpa and Flex; causal and packed), and benchmark training steps
of the ~1B Llama preset (bf16 and FP8, seq 4096, full logits and fused cross-entropy; the bf16 /
FP8 steps with a profile of their top kernels) -> tokens/s, MFU and peak memory; then ours vs transformers
(training step, tools/bench.py; generation, tools/bench_rollout.py), the whole engine in one
process (tools/bench.py --engine) and the fused-loss benchmark. Writes one JSON summary.

    python tools/gpu_check.py --out gpu_check.json              # on a GPU machine (~8 min on one H200: run it with a 560 s limit)
    python tools/gpu_check.py --dry-run --out /tmp/check.json   # CPU: the same code at tiny shapes

Every section runs even when an earlier one fails; a failure is recorded as
{"error": ...} in its place. The JSON is rewritten after every section, and no section starts
after --budget-s seconds (recorded as skipped), so a run that is cut short keeps its results.
It runs from a checkout without installing the package. Sections whose optional package is
missing (flash-attn, Transformer Engine, torchao; megatron-core for the engine's data
pipeline) say "skipped" with the package name. On a machine without them, carry wheels
(torchao 0.18.0 and megatron-core 0.16.1 for Python 3.12: README, "On a GPU"). MFU is reported against the measured dense bf16 matmul rate of this GPU
(the issue's ~790 TFLOP/s on an H200) and against the data-sheet peak.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def max_error(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """max |a - b| in fp32 (0 when both are None)."""
    if a is None and b is None:
        return 0.0
    return float((a.float() - b.float()).abs().max())


def run_section(name: str, fn, summary: dict) -> None:
    """summary[name] = fn(), or the error; prints a line per section."""
    start = time.perf_counter()
    try:
        summary[name] = fn()
    except Exception as exc:  # one failing section must not hide the others
        summary[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    summary[name]["seconds"] = round(time.perf_counter() - start, 1)
    print(f"[gpu_check] {name}: {json.dumps(summary[name])[:400]}", flush=True)


def check_extension(device: torch.device) -> dict:
    """Build (or load) the csrc extension; on CUDA it must include the CUDA kernels."""
    from megatron_domain.kernels.extension import load_extension

    ext = load_extension()
    has_cuda = bool(ext.has_cuda())
    return {"loaded": ext.__name__, "has_cuda": has_cuda, "ok": has_cuda or device.type != "cuda"}


def recorded(out: dict, name: str, fn) -> None:
    """out[name] = fn(), or {"error": ...}: one failing kernel must not hide the others' results."""
    try:
        out[name] = fn()
    except Exception as exc:
        out[name] = {"error": f"{type(exc).__name__}: {exc}"[:1500]}


def check_kernels(device: torch.device, dry: bool) -> dict:
    """Each implementation for this device vs the reference (forward and gradients)."""
    from megatron_domain.kernels.dpo import dpo_loss_reference
    from megatron_domain.kernels.linear_logprobs import linear_logprobs_reference
    from megatron_domain.kernels.pack import pack_metadata_reference
    from megatron_domain.kernels.registry import get_kernel
    from megatron_domain.losses import DPO_LOSS_TYPES

    out: dict = {}
    ext_backend = "cuda" if device.type == "cuda" else "cpp"
    gen = torch.Generator().manual_seed(0)
    rows, seq = (3, 257) if dry else (8, 4096)
    tokens = torch.randint(1, 1000, (rows, seq), generator=gen)
    tokens[torch.rand(rows, seq, generator=gen) < 0.01] = 0

    def pack_equal() -> dict:
        ref = pack_metadata_reference(tokens, 0)
        got = get_kernel("pack_metadata", ext_backend, device)(tokens.to(device), 0)
        return {"equal": all(torch.equal(getattr(ref, f), getattr(got, f).cpu())
                             for f in ("document_ids", "position_ids", "cu_seqlens", "loss_mask"))}

    recorded(out, f"pack_metadata/{ext_backend}", pack_equal)

    n_tokens, pairs = (300, 6) if dry else (8192, 16)
    segments = torch.full((n_tokens,), -1)
    for p in range(2 * pairs):
        start = p * (n_tokens // (2 * pairs))
        segments[start + 3: start + n_tokens // (2 * pairs)] = p
    policy = (-torch.rand(n_tokens, generator=gen) * 3).to(device)
    reference = (policy + torch.randn(n_tokens, generator=gen).to(device) * 0.2)
    segments = segments.to(device)

    def dpo_errors(loss_type: str) -> dict:
        results = []
        for fn in (dpo_loss_reference, get_kernel("dpo_loss", ext_backend, device)):
            p = policy.clone().requires_grad_()
            o = fn(p, reference, segments, pairs, beta=0.1, loss_type=loss_type, label_smoothing=0.1)
            o.losses.sum().backward()
            results.append((o.losses.detach(), p.grad))
        return {"loss_err": max_error(results[0][0], results[1][0]), "grad_err": max_error(results[0][1], results[1][1])}

    for loss_type in DPO_LOSS_TYPES:
        recorded(out, f"dpo_loss/{ext_backend}/{loss_type}", lambda: dpo_errors(loss_type))

    backends = ["chunked"]
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        backends.append("triton")
    n, h, v = (64, 32, 1000) if dry else (4096, 2048, 128256)
    for dtype in (torch.float32, torch.bfloat16):
        hidden = torch.randn(n, h, generator=gen).to(device, dtype)
        weight = (torch.randn(v, h, generator=gen) / h ** 0.5).to(device, dtype)
        targets = torch.randint(0, v, (n,), generator=gen).to(device)
        g_lp, g_ent = torch.randn(n, generator=gen).to(device), torch.randn(n, generator=gen).to(device)

        def run(fn):
            hid, wei = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            lp, ent = fn(hid, wei, targets, with_entropy=True)
            ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
            return lp.detach(), ent.detach(), hid.grad, wei.grad

        want = run(linear_logprobs_reference)
        for backend in backends:
            recorded(out, f"linear_logprobs/{backend}/{str(dtype)[6:]}", lambda: {
                k: max_error(a, b) for k, a, b in zip(("logp_err", "entropy_err", "grad_hidden_err", "grad_weight_err"),
                                                      want, run(get_kernel("linear_logprobs", backend, device)))})
    return out


def check_attention(device: torch.device, dry: bool) -> dict:
    """Every attention backend vs a dense masked reference over packed rows."""
    from megatron_domain.models.attention import ATTENTION_BACKENDS, AttentionContext, dense_document_attention

    bsz, heads, kv_heads, seq, dim = (2, 4, 2, 64, 16) if dry else (2, 32, 8, 4096, 64)
    dtype = torch.float32 if dry else torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(bsz, heads, seq, dim, generator=gen).to(device, dtype)
    k = torch.randn(bsz, kv_heads, seq, dim, generator=gen).to(device, dtype)
    v = torch.randn(bsz, kv_heads, seq, dim, generator=gen).to(device, dtype)
    lengths = [[seq // 4, seq // 2, seq - seq // 4 - seq // 2], [seq]]
    document_ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths]).to(device)
    with torch.no_grad():
        want = dense_document_attention(q, k, v, document_ids, torch.float32)  # [B, Hq, S, D]
    out = {}
    packages = {"flash_varlen": "flash_attn", "te": "transformer_engine"}
    for name, attend in ATTENTION_BACKENDS.items():
        if name in packages and importlib.util.find_spec(packages[name]) is None:
            out[name] = {"skipped": f"{packages[name]} is not installed"}
            continue
        try:
            ctx = AttentionContext.build(document_ids, name)
            with torch.no_grad():
                got = attend(q, k, v, ctx)
            out[name] = {"max_err": max_error(got, want), "tolerance": 1e-5 if dtype == torch.float32 else 3e-2}
            out[name]["ok"] = out[name]["max_err"] <= out[name]["tolerance"]
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return out


def attention_tflops(bsz: int, heads: int, seq: int, dim: int, causal: bool) -> float:
    """Forward + backward matmul TFLOP of one attention call: QK^T and PV forward (4 B H S^2 D,
    halved when causal), 2.5x that backward (dQ, dK, dV and the recomputed scores)."""
    forward = 4 * bsz * heads * seq * seq * dim * (0.5 if causal else 1.0)
    return 3.5 * forward / 1e12


def time_call(fn, device: torch.device, reps: int) -> float:
    """Mean milliseconds of fn() over `reps` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def time_attention(device: torch.device, dry: bool) -> dict:
    """Forward + backward time of each SDPA kernel (flash, cuDNN, memory-efficient, math) and of
    the engine's backends at the 1B preset's attention shape (32 query / 8 KV heads, head dim 64,
    seq 4096), causal and over packed documents: which kernel the engine should ask for on this
    GPU (attention is 1.6 of the 9.0 GFLOP a token at that preset, and stays bf16 under float8)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_domain.models.attention import ATTENTION_BACKENDS, AttentionContext

    bsz, heads, kv_heads, seq, dim = (1, 4, 2, 128, 16) if dry else (1, 32, 8, 4096, 64)
    dtype = torch.float32 if dry else torch.bfloat16
    reps = 2 if dry else 10
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(bsz, heads, seq, dim, generator=gen).to(device, dtype).requires_grad_()
    k = torch.randn(bsz, kv_heads, seq, dim, generator=gen).to(device, dtype).requires_grad_()
    v = torch.randn(bsz, kv_heads, seq, dim, generator=gen).to(device, dtype).requires_grad_()
    grad = torch.randn(bsz, heads, seq, dim, generator=gen).to(device, dtype)
    lengths = torch.tensor([seq // 8, seq // 4, seq // 2, seq - seq // 8 - seq // 4 - seq // 2])
    document_ids = torch.repeat_interleave(torch.arange(4), lengths)[None].to(device)  # [1, S]
    out: dict = {"shape": {"batch": bsz, "heads": heads, "kv_heads": kv_heads, "seq": seq, "head_dim": dim,
                           "dtype": str(dtype)}}

    def measured(attend, causal: bool) -> dict:
        """ms of forward + backward; TFLOP/s for the causal pattern (packed documents do less work)."""
        def step():
            attend().backward(grad)
        ms = time_call(step, device, reps)
        rate = {"tflops": round(attention_tflops(bsz, heads, seq, dim, True) / (ms / 1e3), 3)} if causal else {}
        return {"ms": round(ms, 3), **rate}

    k_rep, v_rep = (t.repeat_interleave(heads // kv_heads, dim=1).detach().requires_grad_() for t in (k, v))
    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    for name, backend in kernels.items():
        if name == "math" and not dry:
            continue  # materializes [H, S, S] scores: no candidate at seq 4096
        if device.type != "cuda" and name in ("cudnn", "efficient"):
            out[f"sdpa_{name}/causal"] = {"skipped": "a CUDA kernel"}
            continue

        def causal_sdpa(backend=backend):
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True)
        recorded(out, f"sdpa_{name}/causal", lambda: measured(causal_sdpa, True))
    for name in ("sdpa", "flex"):  # the engine's backends as a layer calls them (GQA, document mask)
        contexts = {"causal": AttentionContext.build(None, name, (bsz, seq)),
                    "documents": AttentionContext.build(document_ids, name)}
        for layout, ctx in contexts.items():
            def engine_attention(name=name, ctx=ctx):
                return ATTENTION_BACKENDS[name](q, k, v, ctx)
            if name == "flex" and device.type != "cuda":
                out[f"{name}/{layout}"] = {"skipped": "FlexAttention has no backward on a CPU"}
                continue
            recorded(out, f"{name}/{layout}", lambda: measured(engine_attention, layout == "causal"))
    return out


def check_fp8(device: torch.device, dry: bool) -> dict:
    """float8 (torchao) and TE linears vs the bf16 linear on the same inputs: relative error."""
    out: dict = {}
    m, k, n = (64, 64, 64) if dry else (8192, 4096, 4096)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(m, k, generator=gen).to(device)
    linear = torch.nn.Linear(k, n, bias=False).to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        want = linear(x).float()
    if importlib.util.find_spec("torchao") is None:
        out["float8"] = {"skipped": "torchao is not installed"}
    else:
        from megatron_domain.models.ao import convert_to_float8

        holder = torch.nn.Sequential(linear)
        convert_to_float8(holder, emulate=device.type != "cuda")
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            got = holder(x).float()
        out["float8"] = {"relative_error": float((got - want).norm() / want.norm()), "emulated": device.type != "cuda"}
    if importlib.util.find_spec("transformer_engine") is None:
        out["te"] = {"skipped": "transformer_engine is not installed"}
    return out


def run_tool(name: str, args: list[str]) -> dict:
    """Run tools/<name> with `args` in a fresh process; its last stdout line as JSON."""
    import subprocess

    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / name), *args], capture_output=True,
                          text=True, timeout=300)
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip()[-1500:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_losses(dry: bool) -> dict:
    """tools/bench_losses.py (fused linear log-probs + DPO loss vs full logits), its JSON."""
    extra = ["--tokens", "256", "--hidden", "32", "--vocab", "4096", "--iters", "1", "--warmup", "0"] if dry else \
        ["--iters", "5"]
    return run_tool("bench_losses.py", extra)


def bench_vs_transformers(dry: bool) -> dict:
    """tools/bench.py: our bench-20m training step vs transformers' LlamaForCausalLM (issue 2's
    target: >= 1.3x), eager and as the engine runs on a GPU (compiled layers + fused CE)."""
    base = ["--steps", "2", "--warmup", "1", "--seq", "64", "--preset", "tiny-test"] if dry else \
        ["--steps", "30", "--warmup", "5", "--dtype", "bf16"]
    out = {}
    variants = {"eager": [], "compiled_fused_ce": ["--compile", "--fused-ce"]}
    if dry:  # no inductor compile on CPU; the eager bench.py path runs in tests/test_tools.py (--profile --rounds 2)
        variants = {"compiled_fused_ce": ["--fused-ce"]}
        out["eager"] = {"skipped": "dry run: the eager tools/bench.py path runs in tests/test_tools.py (profile test)"}
    for name, extra in variants.items():
        try:
            out[name] = run_tool("bench.py", base + extra)
        except RuntimeError as exc:
            out[name] = {"error": str(exc)}
    return out


def bench_engine(dry: bool) -> dict:
    """tools/bench.py --engine: the whole engine (mdt train, pretrain mode: data pipeline with
    document-masked packing, the default kernels incl. the fused cross-entropy, bf16, compiled
    layers, FlexAttention on a GPU) in one process; needs megatron-core (the data pipeline)."""
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        return {"skipped": "megatron-core is not installed (the engine's data pipeline; carry its wheel)"}
    extra = ["--preset", "tiny-test", "--batch", "2", "--seq", "64", "--steps", "2", "--warmup", "1"] if dry else \
        ["--preset", "llama3.2-1b", "--batch", "4", "--seq", "4096", "--steps", "10", "--warmup", "3", "--dtype", "bf16",
         "--compile", "--attention-backend", "flex"]
    return run_tool("bench.py", ["--engine", *extra])


def bench_rollout(dry: bool) -> dict:
    """tools/bench_rollout.py: the native KV-cache sampler vs transformers' generate (vLLM is not
    installed on the GPU machines), 16 prompts x 4 samples x 128 new tokens of bench-20m."""
    extra = ["--preset", "tiny-test", "--prompts", "2", "--n", "2", "--new-tokens", "4", "--prompt-len", "4",
             "--repeats", "1"] if dry else []
    return run_tool("bench_rollout.py", ["--impls", "native,hf", *extra])


# model fields, batch, seq of the training benchmarks. "8b_16_layers": Llama 3.1 8B's layers (hidden
# 4096, FFN 14336) with half its depth, to fit AdamW in fp32 on one GPU: float8 speeds up the
# decoder linears, 77% of its FLOPs against 65% in the 1B preset (whose 128K-vocabulary output
# layer and attention stay bf16), so it shows what float8 gives at the sizes it is meant for
BENCH_SHAPES = {"1b": ({"preset": "llama3.2-1b"}, 4, 4096),
                "8b_16_layers": ({"preset": "llama3.1-8b", "num_layers": 16}, 1, 4096)}


def bench_training(device: torch.device, dry: bool, fp8: str, steps: int, compile_layers: bool,
                   fused_ce: bool = False, profile_top: int = 0, shape: str = "1b") -> dict:
    """Training steps of the ~1B preset at seq 4096 (or another of BENCH_SHAPES; engine model,
    AdamW, bf16 autocast; full-logits CE, or the fused linear log-probs with `fused_ce`):
    tokens/s, MFU, peak memory; with `profile_top`, the top ops by self time of two more steps
    under torch.profiler."""
    from megatron_domain.config import model_config_from_dict
    from megatron_domain.kernels.registry import get_kernel
    from megatron_domain.losses import masked_cross_entropy_sum
    from megatron_domain.metrics import GPU_PEAK_FLOPS, measured_matmul_flops
    from megatron_domain.models.llama import build_model, materialize, training_flops_per_token
    from megatron_domain.optim import adamw_implementation
    from megatron_domain.profiling import profile_training_steps

    model_fields, batch, seq = ({"preset": "tiny-test"}, 2, 64) if dry else BENCH_SHAPES[shape]
    preset = "/".join(f"{k}={v}" if k != "preset" else str(v) for k, v in model_fields.items())
    cfg = model_config_from_dict(model_fields)
    model = build_model(cfg)
    if fp8 == "float8":
        if importlib.util.find_spec("torchao") is None:
            return {"skipped": "torchao is not installed"}
        from megatron_domain.models.ao import convert_to_float8

        convert_to_float8(model, emulate=device.type != "cuda")
    model = materialize(model, device, seed=0)
    if compile_layers:
        for layer in model.layers.values():
            layer.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **adamw_implementation(device))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen).to(device)
    positions = torch.arange(seq, device=device).expand(batch, seq)
    mask = torch.ones(batch * seq, dtype=torch.bool, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # the loss is linear in the log-probs (minus their mean): told so, the kernel takes the gradients
    # from the forward's own slices, as the engine's causal-LM step (stages/causal_lm.py) does
    kernel = functools.partial(get_kernel("linear_logprobs", "auto", device),
                               loss_weights=-torch.ones(batch * seq, device=device)) if fused_ce else None

    def forward_loss() -> torch.Tensor:
        if fused_ce:
            logp = model(tokens[:, :-1], positions, targets=tokens[:, 1:], logprobs_kernel=kernel)  # [B, S]
            return -logp.sum() / logp.numel()
        logits = model(tokens[:, :-1], positions)  # [B, S, V]
        loss_sum, count = masked_cross_entropy_sum(logits.flatten(0, 1), tokens[:, 1:].flatten(), mask)
        return loss_sum / count

    def optimizer_step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    times, warmup = [], 1 if dry else 3
    for step in range(warmup + steps):
        start = time.perf_counter()
        with autocast():
            loss = forward_loss()
        loss.backward()
        optimizer_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak_memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    tokens_per_s = batch * seq * len(times) / sum(times)
    flops = training_flops_per_token(cfg, seq) * tokens_per_s
    measured = measured_matmul_flops(device, torch.bfloat16, size=256 if dry else 8192)
    sheet = next((v for k, v in GPU_PEAK_FLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), 0)
    result = {"preset": preset, "batch": batch, "seq": seq, "fp8": fp8, "compiled": compile_layers,
              "fused_ce": fused_ce, "tokens_per_s": tokens_per_s, "step_time_s": sum(times) / len(times),
              "mfu_vs_measured_matmul": flops / measured, "measured_matmul_tflops": measured / 1e12,
              "mfu_vs_datasheet": flops / sheet if sheet else None, "final_loss": float(loss.detach()),
              "peak_memory_gb": peak_memory}
    if profile_top:  # where the step's time goes (kernels by device time on a GPU), 2 more steps
        result["profile"], _ = profile_training_steps(forward_loss, optimizer_step, 2, device, profile_top, autocast())
    return result


def main() -> None:
    """Parse arguments, run every section, write the JSON summary atomically and print it."""
    from megatron_domain.files import write_json_atomic

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: test the script itself")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per benchmark")
    parser.add_argument("--no-compile", action="store_true", help="benchmark without torch.compile per layer")
    parser.add_argument("--skip", nargs="*", default=[], help="section names to skip")
    parser.add_argument("--profile-top", type=int, default=15,
                        help="ops listed from a profiled bf16 / float8 step (0: no profile)")
    parser.add_argument("--budget-s", type=float, default=480,
                        help="start no section after this many seconds (the rest are recorded as skipped)")
    args = parser.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or use --dry-run")
    device = torch.device("cpu" if dry else "cuda")
    summary: dict = {"torch": torch.__version__, "device": "cpu (dry run)" if dry else torch.cuda.get_device_name(),
                     "triton": None, "dry_run": dry}
    if importlib.util.find_spec("triton") is not None:
        import triton

        summary["triton"] = triton.__version__
    compile_layers = not args.no_compile and not dry
    steps = args.steps if not dry else 2
    # the checks first, then the benchmarks in the order of the goals they measure (bf16 MFU, FP8
    # speed-up, ours vs transformers), so a run cut short still answers the most
    sections = {
        "extension": lambda: check_extension(device),
        "kernels": lambda: check_kernels(device, dry),
        "attention": lambda: check_attention(device, dry),
        "fp8": lambda: check_fp8(device, dry),
        "attention_speed": lambda: time_attention(device, dry),
        "bench_bf16": lambda: bench_training(device, dry, "none", steps, compile_layers, profile_top=args.profile_top),
        "bench_fp8": lambda: bench_training(device, dry, "float8", steps, compile_layers, profile_top=args.profile_top),
        "bench_vs_transformers": lambda: bench_vs_transformers(dry),
        "bench_bf16_fused_ce": lambda: bench_training(device, dry, "none", steps, compile_layers, fused_ce=True),
        "bench_fp8_fused_ce": lambda: bench_training(device, dry, "float8", steps, compile_layers, fused_ce=True),
        "bench_bf16_8b_16_layers": lambda: bench_training(device, dry, "none", steps, compile_layers, fused_ce=True,
                                                          shape="8b_16_layers"),
        "bench_fp8_8b_16_layers": lambda: bench_training(device, dry, "float8", steps, compile_layers, fused_ce=True,
                                                         shape="8b_16_layers"),
        "engine": lambda: bench_engine(dry),
        "bench_losses": lambda: bench_losses(dry),
        "bench_rollout": lambda: bench_rollout(dry),
    }
    start = time.perf_counter()
    for name, fn in sections.items():
        if name in args.skip:
            continue
        if time.perf_counter() - start > args.budget_s:
            summary[name] = {"skipped": f"the --budget-s of {args.budget_s:.0f} s was spent before this section"}
        else:
            run_section(name, fn, summary)
        for suffix in ("", "_fused_ce", "_8b_16_layers"):  # the FP8 goal: float8 tokens/s over bf16's, same loss path
            bf16, fp8 = summary.get(f"bench_bf16{suffix}", {}), summary.get(f"bench_fp8{suffix}", {})
            if "tokens_per_s" in bf16 and "tokens_per_s" in fp8:
                summary[f"fp8_speedup{suffix}"] = fp8["tokens_per_s"] / bf16["tokens_per_s"]
        summary["seconds"] = round(time.perf_counter() - start, 1)
        write_json_atomic(args.out, summary)  # after every section: a run killed midway keeps what it measured
    print(json.dumps({k: v for k, v in summary.items() if k not in ("kernels",)}, default=str)[:6000])


if __name__ == "__main__":
    main()
