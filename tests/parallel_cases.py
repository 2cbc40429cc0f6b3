"""Worker side of the parallel parity tests: build a layout's trainer, take the gradients of
the first step (gathered to full tensors by parameter name) and the losses of a short run."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megatron_domain.config import config_from_dict
from megatron_domain.data.tokenizer import load_tokenizer
from megatron_domain.engine import build_trainer, forward_backward, normalize_gradients, train
from megatron_domain.models.llama import canonical_name


def parity_config_dict(corpora: dict, run_dir: Path | str, parallel: dict | None = None, steps: int = 3,
                       dtype: str = "fp32", lora: dict | None = None, fp8: dict | None = None,
                       kernels: dict | None = None, **model) -> dict:
    """A 4-layer GQA model (4 heads, 2 KV heads) on the synthetic blend: global batch 8 of
    micro-batches of 2, seq 32, so every layout here divides it. Without pipeline stages the
    run also evaluates held-out perplexity after step 3 (`eval_ppl/alpha` in metrics.jsonl)."""
    pipelined = (parallel or {}).get("pp", 1) > 1
    return {
        "mode": "pretrain",
        "model": {"preset": "tiny-test", "num_layers": 4, **model},
        "data": {"tokenizer": corpora["tokenizer"], "seq_len": 32,
                 "corpora": [{"name": "alpha", "path": corpora["alpha_train"], "weight": 0.7},
                             {"name": "beta", "path": corpora["beta_train"], "weight": 0.3}]},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1},
        "train": {"run_dir": str(run_dir), "steps": steps, "micro_batch_size": 2, "global_batch_size": 8,
                  "device": "cpu", "progress": False, "seed": 7, "dtype": dtype},
        "parallel": parallel or {},
        "eval": {"sets": [{"name": "alpha", "path": corpora["alpha_heldout"]}], "interval": 0 if pipelined else 3,
                 "max_rows": 4, "batch_size": 2},
        "lora": lora or {},
        "fp8": fp8 or {},
        "kernels": kernels or {},
    }


def full_gradients(trainer) -> dict[str, torch.Tensor]:
    """{parameter name: full gradient} over the whole model (every rank gets all of them)."""
    local = {}
    for part in trainer.model.parts:
        for name, param in part.named_parameters():
            if param.grad is None:  # frozen (a LoRA run's base)
                continue
            grad = param.grad
            if isinstance(grad, DTensor):
                grad = grad.full_tensor()
            local[canonical_name(name)] = grad.detach().clone()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    merged: dict = {}
    for entry in gathered:
        merged.update(entry)
    return merged


def first_step(cfg_dict: dict) -> tuple[float, dict[str, torch.Tensor]]:
    """(job loss, full gradients) of step 0, normalized as the optimizer sees them."""
    cfg = config_from_dict(cfg_dict)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    trainer = build_trainer(cfg, torch.device("cpu"), Path(cfg.train.run_dir), tokenizer)
    loss, _, _ = normalize_gradients(trainer, *forward_backward(trainer, 0))
    return loss, full_gradients(trainer)


def layout_result(cfg_dict: dict) -> dict:
    """Loss and gradients of step 0, and the losses of a short training run."""
    loss, grads = first_step(cfg_dict)
    losses = train(config_from_dict(cfg_dict)).losses
    return {"loss": loss, "grads": grads, "losses": losses}


def checkpoint_logits(cfg_dict: dict, checkpoint: str) -> torch.Tensor:
    """Full logits [B, S, V] of the first micro-batch after loading `checkpoint`'s weights
    into the layout of `cfg_dict` (pipeline layouts excluded: they return no logits)."""
    cfg = config_from_dict({**cfg_dict, "model": {**cfg_dict["model"], "init_from": checkpoint}})
    trainer = build_trainer(cfg, torch.device("cpu"), Path(cfg.train.run_dir), load_tokenizer(cfg.data.tokenizer))
    batch = trainer.stage.batches(0)[0]
    with torch.no_grad():
        logits = trainer.model.parts[0](batch["tokens"], batch["position_ids"], batch["document_ids"])
    return logits.full_tensor() if isinstance(logits, DTensor) else logits


def resume_copy(cfg_dict: dict, source_run: str) -> list[float]:
    """Copy `source_run`'s checkpoints into this run's directory, then resume from them (so
    several layouts can each resume the same saved run); returns the losses."""
    cfg = config_from_dict(cfg_dict)
    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.copytree(Path(source_run) / "checkpoints", Path(cfg.train.run_dir) / "checkpoints")
    if dist.is_initialized():
        dist.barrier()
    return train(cfg, resume=True).losses


def run_job(kind: str, cfg_dict: dict, arg=None):
    """One unit of work of the parity tests, the same on every rank: `layout` ->
    layout_result; `train` -> losses; `continue` -> losses of `train --resume` in the run's own
    directory; `resume` -> resume_copy(arg); `logits` -> checkpoint_logits(arg)."""
    if kind == "layout":
        return layout_result(cfg_dict)
    if kind == "train":
        return train(config_from_dict(cfg_dict)).losses
    if kind == "continue":
        return train(config_from_dict(cfg_dict), resume=True).losses
    if kind == "resume":
        return resume_copy(cfg_dict, arg)
    if kind == "logits":
        return checkpoint_logits(cfg_dict, arg)
    raise ValueError(f"unknown job kind {kind!r}")


def run_jobs(rank: int, jobs: list[tuple[str, str, dict, object]], out_dir: str) -> None:
    """Run (name, kind, cfg_dict, arg) jobs in order on every rank; rank 0 saves each result
    to out_dir/<name>.pt."""
    for name, kind, cfg_dict, arg in jobs:
        result = run_job(kind, cfg_dict, arg)
        if rank == 0:
            torch.save(result, Path(out_dir) / f"{name}.pt")


def clipping_scales_every_placement(rank: int) -> None:
    """Gradients as Partial(sum) (a replicated norm weight under sequence parallelism), Shard,
    Replicate and a plain tensor: `clip_grads` must give the norm of the full gradients and
    scale all of them (asserted on every rank)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard

    from megatron_domain.parallel.grads import clip_grads

    mesh = init_device_mesh("cpu", (2,))
    placements = [Partial(), Shard(0), Replicate()]
    locals_ = [torch.full((4,), float(rank + 1)), torch.full((4,), 2.0), torch.full((4,), -1.0)]
    params = []
    for placement, local in zip(placements, locals_):
        param_placement = Replicate() if isinstance(placement, Partial) else placement
        param = torch.nn.Parameter(DTensor.from_local(torch.ones(4), mesh, [param_placement]))
        param.grad = DTensor.from_local(local, mesh, [placement])
        params.append(param)
    plain = torch.nn.Parameter(torch.ones(3))
    plain.grad = torch.full((3,), 4.0)
    full = [p.grad.full_tensor().clone() for p in params] + [plain.grad.clone()]  # [3] x 4, [8], [4], [3]
    want_norm = torch.cat(full).norm()
    norm = clip_grads(params + [plain], 1.0, None)
    assert abs(norm - float(want_norm)) < 1e-5, (norm, float(want_norm))
    got = [p.grad.full_tensor() for p in params] + [plain.grad]
    for name, before, after in zip(("partial", "shard", "replicate", "plain"), full, got):
        torch.testing.assert_close(after, before / want_norm, rtol=1e-6, atol=1e-7, msg=f"{name} gradient not clipped")
