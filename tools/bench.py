#!/usr/bin/env python
"""Training-step throughput of megatron-domain's model vs Hugging Face transformers'
LlamaForCausalLM with the same shapes, optimizer (torch AdamW) and dtype, in one run.

    python tools/bench.py                       # bench-20m preset, batch 4 x seq 512, fp32, CPU
    python tools/bench.py --steps 20 --preset bench-20m --batch 4 --seq 512 --dtype bf16
    python tools/bench.py --dtype bf16 --compile --fused-ce      # a GPU: ours as the engine runs it there
    python tools/bench.py --parallel tp=2 --parallel pp=2     # engine: 1 process vs each layout
    python tools/bench.py --engine --dtype bf16 --compile     # engine: one process only
    python tools/bench.py --dtype bf16 --profile                 # + torch.profiler: top ops, fwd/bwd/optimizer

Each implementation runs in its own subprocess (clean peak-memory numbers, no shared caches);
the parent prints one JSON line: tokens/s, MFU and peak memory of each, and the speed ratio.
`--profile` then runs `--profile-steps` more steps of each under torch.profiler and adds, per
implementation, the time of forward / backward / optimizer (wall time of each phase), the
share of the step in matrix multiplies, and the top ops by self time (the table is also printed
to stderr).

With `--parallel`, the whole engine (`mdt train`: data pipeline, parallel model, optimizer)
runs under torchrun on a synthetic corpus, once as a single process and once per layout
(`tp=2`, `pp=2`, `tp=2,dp_shard=2`, ...: keys of the config's `parallel` section). The CPU
threads are split evenly between the processes, and MFU uses the same per-thread matmul
peak for all, so the ratios compare layouts, not thread counts. The output layer is untied
in this mode (pipeline stages cannot share a tied embedding), for every layout alike.
`--engine` runs only the single process (`--compile` -> `train.compile`, `--attention-backend`
-> `model.attention_backend`); on a GPU, MFU is against the data sheet.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from megatron_domain.convert import DTYPES  # noqa: E402  (after the path insert)


def build(impl: str, preset: str, seq: int, device: torch.device, dtype: torch.dtype, compile_layers: bool = False,
          fused_ce: bool = False):
    """(model, forward_loss(tokens) -> scalar loss, flops_per_token) for `impl` in {ours, hf}.
    Ours can compile each decoder layer and fuse the cross-entropy into the output layer
    (kernels.fused_cross_entropy), as the engine does on a GPU."""
    from megatron_domain.config import config_from_dict
    from megatron_domain.losses import masked_cross_entropy_sum
    from megatron_domain.models.llama import build_model, materialize, training_flops_per_token

    cfg = config_from_dict({"model": {"preset": preset}, "data": {"seq_len": seq}}).model
    flops = training_flops_per_token(cfg, seq)
    if impl == "ours":
        model = materialize(build_model(cfg), device, seed=0)
        positions = torch.arange(seq, device=device)[None]
        if compile_layers:
            for layer in model.layers.values():
                layer.compile()
        if fused_ce:
            from megatron_domain.kernels.registry import get_kernel

            kernel = get_kernel("linear_logprobs", "auto", device)

            def fused_forward_loss(tokens):
                # the loss is the mean of -logp: told so, the kernel computes its gradients in the
                # forward pass (as the engine's causal-LM step does)
                weights = -torch.ones(tokens[:, 1:].numel(), device=device)  # [B*S]
                logp = model(tokens[:, :-1], positions.expand(tokens.shape[0], -1), targets=tokens[:, 1:],
                             logprobs_kernel=functools.partial(kernel, loss_weights=weights))  # [B, S]
                return -logp.mean()
            return model, fused_forward_loss, flops

        def forward_loss(tokens):
            logits = model(tokens[:, :-1], positions.expand(tokens.shape[0], -1))  # [B, S, V]
            loss_sum, count = masked_cross_entropy_sum(logits.flatten(0, 1), tokens[:, 1:].flatten(),
                                                       torch.ones_like(tokens[:, 1:], dtype=torch.bool).flatten())
            return loss_sum / count
        return model, forward_loss, flops
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).to(device)

    def forward_loss(tokens):
        return model(input_ids=tokens[:, :-1], labels=tokens[:, :-1].clone()).loss
    return model, forward_loss, flops


def run_one(args) -> dict:
    """Time `args.steps` training steps of one implementation (after `args.warmup` untimed ones)."""
    from megatron_domain.metrics import peak_flops

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    ours_only = args.impl == "ours"
    model, forward_loss, flops_per_token = build(args.impl, args.preset, args.seq, device, dtype,
                                                 args.compile and ours_only, args.fused_ce and ours_only)
    from megatron_domain.optim import adamw_implementation

    # the same torch AdamW implementation for both (the engine's choice for this device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **adamw_implementation(device))
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size if args.impl == "hf" else model.cfg.vocab_size
    tokens = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        with autocast:
            loss = forward_loss(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    tokens_per_step = args.batch * args.seq
    tokens_per_s = tokens_per_step * len(times) / sum(times)
    profile = None
    if args.profile:
        from megatron_domain.profiling import profile_training_steps

        def optimizer_step() -> None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        profile, table = profile_training_steps(lambda: forward_loss(tokens), optimizer_step, args.profile_steps,
                                                device, args.profile_top, autocast)
        print(table, file=sys.stderr)
    peak = args.peak_flops or peak_flops(device, dtype=dtype)
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (peak RSS)
    return {"impl": args.impl, "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token / peak,
            "peak_memory_gb": peak_mem, "step_time_s": sum(times) / len(times), "final_loss": float(loss.detach()),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, **({"profile": profile} if profile else {})}


def make_bench_data(root: Path, vocab_limit: int, num_docs: int = 400, seed: int = 0) -> dict:
    """A throwaway tokenizer and a corpus of random-token documents (throughput does not depend
    on the text) for the engine benchmark."""
    from megatron_domain.data.indexed import write_indexed_dataset
    from megatron_domain.data.tokenizer import train_bpe_tokenizer

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    texts = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(200)]
    tok = train_bpe_tokenizer(texts, min(vocab_limit, 4096), root / "tokenizer.json")
    docs = ([rng.randrange(tok.vocab_size - 1) for _ in range(rng.randint(100, 3000))] + [tok.eod_id]
            for _ in range(num_docs))
    write_indexed_dataset(root / "corpus", docs, tok.vocab_size)
    return {"tokenizer": str(root / "tokenizer.json"), "corpus": str(root / "corpus")}


def parse_layout(text: str) -> dict:
    """`tp=2,pp=2` -> {"tp": 2, "pp": 2}; world size = the product of the degrees."""
    layout = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        layout[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return layout


def run_layout(args, data: dict, layout: dict, root: Path, per_thread_flops: float) -> dict:
    """Train the preset under torchrun with `layout`; mean metrics over the timed steps."""
    import yaml

    from megatron_domain.metrics import read_metrics

    world = 1
    for key in ("tp", "pp", "dp_shard", "dp_replicate"):
        world *= int(layout.get(key, 1))
    layout = {"dp_shard": 1, **layout}
    threads = max(1, (args.threads or os.cpu_count()) // world)
    peak = per_thread_flops * threads if args.device == "cpu" else per_thread_flops  # a GPU: one per process
    pp = int(layout.get("pp", 1))
    name = "_".join(f"{k}{v}" for k, v in layout.items() if v != 1) or "single"
    # untied output layer for every layout: pipeline stages cannot share a tied embedding
    cfg = {"mode": "pretrain", "model": {"preset": args.preset, "tie_embeddings": False,
                                         "attention_backend": args.attention_backend},
           "data": {"tokenizer": data["tokenizer"], "seq_len": args.seq,
                    "corpora": [{"name": "bench", "path": data["corpus"], "weight": 1.0}]},
           "train": {"run_dir": str(root / name), "steps": args.warmup + args.steps, "dtype": args.dtype,
                     "micro_batch_size": args.batch // pp if pp > 1 else args.batch,
                     "global_batch_size": args.batch, "device": args.device, "num_threads": threads,
                     "peak_tflops": peak / 1e12, "progress": False, "compile": args.compile},
           "parallel": layout}
    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd = ["torchrun", "--standalone", "--nproc-per-node", str(world), "-m", "megatron_domain.cli", "train",
           str(config), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"layout {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    timed = read_metrics(root / name)[args.warmup:]
    mean = lambda key: sum(r[key] for r in timed) / len(timed)  # noqa: E731
    return {"layout": name, "processes": world, "threads_per_process": threads,
            "micro_batch_size": cfg["train"]["micro_batch_size"], "tokens_per_s": mean("tokens_per_s"),
            "tokens_per_s_per_process": mean("tokens_per_s_per_gpu"), "mfu": mean("mfu"),
            "peak_memory_gb_rank0": max(r["peak_memory_gb"] for r in timed), "final_loss": timed[-1]["loss"]}


def bench_layouts(args) -> dict:
    """1 process vs every `--parallel` layout of the engine, same global batch."""
    from megatron_domain.config import config_from_dict
    from megatron_domain.metrics import measured_matmul_flops

    vocab = config_from_dict({"model": {"preset": args.preset}, "data": {"seq_len": args.seq}}).model.vocab_size
    if args.device == "cpu":
        torch.set_num_threads(1)
        per_thread = measured_matmul_flops(torch.device(args.device), DTYPES[args.dtype], size=1024, repeats=10,
                                           min_seconds=1.0)
    else:  # one GPU per process: its data-sheet peak in the training dtype
        from megatron_domain.metrics import peak_flops

        per_thread = peak_flops(torch.device(args.device), dtype=DTYPES[args.dtype])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_bench_data(root, vocab)
        results = [run_layout(args, data, {}, root, per_thread)]
        results += [run_layout(args, data, parse_layout(text), root, per_thread) for text in args.parallel]
    base = results[0]["tokens_per_s"]
    for r in results:
        r["speed_vs_single_process"] = r["tokens_per_s"] / base
    from megatron_domain.metrics import machine_record

    return {"bench": "parallel_layouts", **machine_record(args.device), "preset": args.preset,
            "global_batch": args.batch, "seq": args.seq,
            "dtype": args.dtype, "device": args.device, "steps": args.steps, "layouts": results}


def median_run(runs: list[dict]) -> dict:
    """One implementation's result over several rounds: the median round's speed (tokens/s,
    MFU, step time), the largest peak memory, every round's tokens/s, the first's profile."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
    result = {**runs[0], **{k: ranked[len(ranked) // 2][k] for k in ("tokens_per_s", "mfu", "step_time_s")},
              "peak_memory_gb": max(r["peak_memory_gb"] for r in runs)}
    if len(runs) > 1:
        result["tokens_per_s_rounds"] = [r["tokens_per_s"] for r in runs]
    return result


def main() -> None:
    """Parse arguments; benchmark ours and transformers (or the parallel layouts); print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench-20m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parallel", action="append", default=[], metavar="LAYOUT",
                        help="benchmark the engine at this layout (e.g. tp=2, pp=2, tp=2,dp_shard=2) against one "
                             "process; repeatable")
    parser.add_argument("--engine", action="store_true",
                        help="benchmark the engine (mdt train, pretrain mode, random-token documents) in one process")
    parser.add_argument("--attention-backend", default="sdpa", help="the engine's model.attention_backend")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads to split between processes "
                        "(default: all cores)")
    parser.add_argument("--rounds", type=int, default=1, help="alternate ours and transformers this many times and "
                        "report each one's median round (for noisy machines)")
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile each decoder layer")
    parser.add_argument("--fused-ce", action="store_true", help="ours: cross-entropy fused into the output layer")
    parser.add_argument("--profile", action="store_true", help="add a torch.profiler breakdown of each")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--profile-top", type=int, default=15, help="ops listed by self time")
    parser.add_argument("--peak-flops", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.parallel or args.engine:
        print(json.dumps(bench_layouts(args)))
        return
    if args.impl:
        print(json.dumps(run_one(args)))
        return
    impls = ["ours"]
    try:
        import transformers  # noqa: F401
        impls.append("hf")
    except ImportError:
        pass
    # one MFU denominator for both (measured once here: per-process measurements of a CPU's
    # matmul rate differed by ~15% in one run, which made equal speeds show different MFUs)
    from megatron_domain.metrics import peak_flops

    peak = peak_flops(torch.device(args.device), dtype=DTYPES[args.dtype], min_seconds=1.0)
    runs: dict[str, list[dict]] = {impl: [] for impl in impls}
    for round_index in range(args.rounds):  # ours, hf, ours, hf, ...: a noisy machine's drift hits both alike
        for impl in impls:
            cmd = [sys.executable, __file__, "--impl", impl, "--peak-flops", str(peak)] + sys.argv[1:]
            if round_index > 0 and "--profile" in cmd:
                cmd.remove("--profile")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if proc.returncode:  # the child's own error, not only "exit status 1"
                sys.exit(f"tools/bench.py --impl {impl} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            if args.profile and round_index == 0:
                sys.stderr.write(f"--- profile of {impl} ({args.dtype}) ---\n{proc.stderr}")
            runs[impl].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results = {impl: median_run(r) for impl, r in runs.items()}
    from megatron_domain.metrics import machine_record

    summary = {"bench": "train_step", **machine_record(args.device), "preset": args.preset, "batch": args.batch,
               "seq": args.seq,
               "dtype": args.dtype, "device": args.device, "threads": torch.get_num_threads(),
               "ours_compiled": args.compile, "ours_fused_ce": args.fused_ce, **{
                   f"{impl}_{k}": v for impl, r in results.items() for k, v in r.items() if k != "impl"}}
    if "hf" in results:
        summary["speedup_vs_hf"] = results["ours"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
        if args.rounds > 1:  # each round's ratio, ours vs the hf run right after it
            summary["speedup_vs_hf_rounds"] = [o["tokens_per_s"] / h["tokens_per_s"]
                                               for o, h in zip(runs["ours"], runs["hf"])]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
