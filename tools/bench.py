#!/usr/bin/env python
"""Training-step throughput of megatron-domain's model vs Hugging Face transformers'
LlamaForCausalLM with the same shapes, optimizer (torch AdamW) and dtype, in one run.

    python tools/bench.py                       # bench-20m preset, batch 4 x seq 512, fp32, CPU
    python tools/bench.py --steps 20 --preset bench-20m --batch 4 --seq 512 --dtype bf16

Each implementation runs in its own subprocess (clean peak-memory numbers, no shared caches);
the parent prints one JSON line: tokens/s, MFU and peak memory of each, and the speed ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def build(impl: str, preset: str, seq: int, device: torch.device, dtype: torch.dtype):
    """(model, forward_loss(tokens) -> scalar loss, flops_per_token) for `impl` in {ours, hf}."""
    from megatron_domain.config import config_from_dict
    from megatron_domain.losses import masked_cross_entropy_sum
    from megatron_domain.models.llama import build_model, materialize, training_flops_per_token

    cfg = config_from_dict({"model": {"preset": preset}, "data": {"seq_len": seq}}).model
    flops = training_flops_per_token(cfg, seq)
    if impl == "ours":
        model = materialize(build_model(cfg), device, seed=0)
        positions = torch.arange(seq, device=device)[None]

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
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, forward_loss, flops_per_token = build(args.impl, args.preset, args.seq, device, dtype)
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
    peak = peak_flops(device, dtype=dtype)
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (peak RSS)
    return {"impl": args.impl, "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token / peak,
            "peak_memory_gb": peak_mem, "step_time_s": sum(times) / len(times), "final_loss": float(loss),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench-20m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impl", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        print(json.dumps(run_one(args)))
        return
    results = {}
    impls = ["ours"]
    try:
        import transformers  # noqa: F401
        impls.append("hf")
    except ImportError:
        pass
    for impl in impls:
        cmd = [sys.executable, __file__, "--impl", impl] + sys.argv[1:]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
        results[impl] = json.loads(out.strip().splitlines()[-1])
    summary = {"bench": "train_step", "preset": args.preset, "batch": args.batch, "seq": args.seq,
               "dtype": args.dtype, "device": args.device, "threads": torch.get_num_threads(), **{
                   f"{impl}_{k}": v for impl, r in results.items() for k, v in r.items() if k != "impl"}}
    if "hf" in results:
        summary["speedup_vs_hf"] = results["ours"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
