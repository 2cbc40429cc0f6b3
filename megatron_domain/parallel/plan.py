"""`mdt train CONFIG --dry-run --world-size N`: the layout of a run without running it.

Everything is computed from the meta-device model (no weights are allocated), so a 70B layout
for a cluster can be checked on a laptop: the resolved mesh, which layers every pipeline rank
holds, parameters per GPU after TP and FSDP sharding, and an estimate of memory per GPU.

Memory estimate per GPU (bytes), for the rank of each pipeline stage:
- weights, gradients and AdamW moments: 4 + 4 + 8 = 16 bytes per local parameter (fp32
  master weights, fp32 reduced gradients, two fp32 moments), local = after TP and FSDP;
- FSDP working set (dp_shard > 1): two layers unsharded at once (current + prefetch), weights
  and gradients in the compute dtype;
- activations per micro-batch and layer, compute dtype e bytes, TP/SP-sharded (Korthikanti
  et al. 2022, adapted to SwiGLU + GQA, flash attention so no S^2 term):
  none: e*S*b*(7H + 2*KV + 4I)/tp; selective: e*S*b*(4H + 2*KV + 2I)/tp;
  full: e*S*b*H/tp per layer plus one layer's `none` activations while it recomputes;
  times the micro-batches in flight (1F1B and interleaved: pp on the first stage; GPipe: all);
- the last stage's fp32 logits and their gradient: 2 * 4 * S * b * V / tp.
It leaves out allocator fragmentation, communication buffers and the CUDA context (~2-5 GB).
"""

from __future__ import annotations

import math

from megatron_domain.config import Config
from megatron_domain.models.llama import build_model
from megatron_domain.parallel.dims import resolve_parallel_dims
from megatron_domain.parallel.pipeline import layer_split, stages_of_rank, split_model
from megatron_domain.parallel.tensor import is_tensor_parallel_sharded


def _activation_bytes_per_layer(cfg: Config, mode: str, tp: int) -> float:
    m = cfg.model
    e = 2 if cfg.train.dtype in ("bf16", "auto") else 4  # auto: bf16 on the GPUs a plan is for
    tokens = cfg.data.seq_len * cfg.train.micro_batch_size
    kv = m.num_kv_heads * m.resolved_head_dim
    widths = {"none": 7 * m.hidden_size + 2 * kv + 4 * m.intermediate_size,
              "selective": 4 * m.hidden_size + 2 * kv + 2 * m.intermediate_size,
              "full": m.hidden_size}
    return e * tokens * widths[mode] / tp


def plan_layout(cfg: Config, world_size: int) -> dict:
    """The resolved layout and per-stage parameter and memory estimates (see module doc)."""
    dims = resolve_parallel_dims(cfg, world_size)
    model = build_model(cfg.model)
    virtual = cfg.parallel.pp_virtual_stages if dims.pp > 1 else 1
    schedule = cfg.parallel.pp_schedule if dims.pp > 1 else "none"
    num_stages = dims.pp * virtual
    split = layer_split(cfg.model.num_layers, num_stages, cfg.parallel.pp_layers or None)
    e = 2 if cfg.train.dtype in ("bf16", "auto") else 4
    num_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dims.dp)
    in_flight = num_micro if schedule == "gpipe" else min(num_micro, dims.pp)
    ac = cfg.train.activation_checkpointing
    ranks = []
    for pp_rank in range(dims.pp):
        stage_ids = stages_of_rank(pp_rank, dims.pp, virtual, schedule) if dims.pp > 1 else [0]
        local_params = 0.0
        layers = []
        largest_layer = 0.0
        for s in stage_ids:
            chunk = split_model(model, s, num_stages, split[s]) if dims.pp > 1 else model
            for name, p in chunk.named_parameters():
                local_params += p.numel() / (dims.tp if is_tensor_parallel_sharded(name, chunk) else 1)
            for layer_name, layer in chunk.layers.items():
                layers.append(int(layer_name))
                largest_layer = max(largest_layer, sum(
                    p.numel() / (dims.tp if is_tensor_parallel_sharded(f"layers.{layer_name}.{n}", chunk) else 1)
                    for n, p in layer.named_parameters()))
        sharded = local_params / dims.dp_shard
        state_gb = 16 * sharded / 2**30
        fsdp_gb = (2 * 2 * largest_layer * e / 2**30) if dims.dp_shard > 1 else 0.0
        per_layer = _activation_bytes_per_layer(cfg, ac, dims.tp)
        acts = per_layer * len(layers)
        if ac == "full":
            acts += _activation_bytes_per_layer(cfg, "none", dims.tp)
        has_last = num_stages - 1 in stage_ids
        logits_gb = (2 * 4 * cfg.data.seq_len * cfg.train.micro_batch_size * cfg.model.vocab_size / dims.tp / 2**30
                     if has_last else 0.0)
        act_gb = acts * in_flight / 2**30
        ranks.append({
            "pp_rank": pp_rank, "stages": stage_ids,
            "layer_ranges": [f"{split[s][0]}-{split[s][1] - 1}" for s in stage_ids],
            "holds": (["embedding"] if 0 in stage_ids else []) + (["norm+output"] if has_last else []),
            "params_per_gpu": int(math.ceil(sharded)),
            "memory_gb": {"weights_grads_adam": round(state_gb, 2), "fsdp_unsharded_layers": round(fsdp_gb, 2),
                          "activations": round(act_gb, 2), "logits": round(logits_gb, 2),
                          "total": round(state_gb + fsdp_gb + act_gb + logits_gb, 2)},
        })
    total = sum(p.numel() for p in model.parameters())
    return {"mesh": dims.describe(), "world_size": dims.world_size, "total_params": total,
            "pp_schedule": schedule, "virtual_stages": virtual, "micro_batches_per_step": num_micro,
            "activation_checkpointing": ac, "ranks": ranks}


def format_plan(plan: dict) -> str:
    """The plan as a readable table."""
    lines = [f"mesh: {plan['mesh']}",
             f"model: {plan['total_params'] / 1e9:.2f}B parameters; pipeline schedule {plan['pp_schedule']}, "
             f"{plan['virtual_stages']} stage(s) per rank, {plan['micro_batches_per_step']} micro-batches per step; "
             f"activation checkpointing {plan['activation_checkpointing']}",
             f"{'pp rank':>7}  {'stages':<8} {'layers':<16} {'also holds':<22} {'params/GPU':>12} "
             f"{'state GB':>9} {'fsdp GB':>8} {'act GB':>8} {'logits GB':>9} {'total GB':>9}"]
    for r in plan["ranks"]:
        mem = r["memory_gb"]
        lines.append(f"{r['pp_rank']:>7}  {','.join(map(str, r['stages'])):<8} {' '.join(r['layer_ranges']):<16} "
                     f"{'+'.join(r['holds']) or '-':<22} {r['params_per_gpu']:>12,} {mem['weights_grads_adam']:>9.2f} "
                     f"{mem['fsdp_unsharded_layers']:>8.2f} {mem['activations']:>8.2f} {mem['logits']:>9.2f} "
                     f"{mem['total']:>9.2f}")
    lines.append("(every rank of a pp stage holds the same amount; estimates exclude the CUDA context, "
                 "communication buffers and fragmentation)")
    return "\n".join(lines)
