"""Worker side of the rollout tests: the native sampler on a model built by the engine's own
`prepare_model` at any parallel layout, with optional non-zero LoRA adapters."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_domain.config import config_from_dict
from megatron_domain.engine import prepare_model, setup_parallel
from megatron_domain.models.llama import copy_full_tensor
from megatron_domain.models.lora import is_adapter_param
from megatron_domain.rollout.native import NativeSampler
from megatron_domain.rollout.sampling import SamplingParams


def sampler_config(parallel: dict | None = None, lora: dict | None = None) -> dict:
    """The tiny-test model (4 heads, 2 KV heads) at a layout; no data needed to generate."""
    return {"model": {"preset": "tiny-test", "init_std": 0.08}, "data": {"seq_len": 64},
            "train": {"device": "cpu", "seed": 11, "progress": False},
            "parallel": {"dp_shard": 1, **(parallel or {})}, "lora": lora or {}}


@torch.no_grad()
def randomize_adapters(model: torch.nn.Module, seed: int = 5) -> None:
    """Give every LoRA A and B layout-independent non-zero values (B starts at zero)."""
    for name, param in model.named_parameters():
        if is_adapter_param(name):
            gen = torch.Generator().manual_seed(seed + len(name) * 7919 + sum(map(ord, name)))
            copy_full_tensor(param, torch.randn(tuple(param.shape), generator=gen) * 0.2)


def build_sampler_model(cfg_dict: dict) -> torch.nn.Module:
    """This rank's model of the layout in `cfg_dict`, seeded (and with random adapters)."""
    cfg = config_from_dict(cfg_dict)
    dims, mesh = setup_parallel(cfg, torch.device("cpu"))
    model = prepare_model(cfg, dims, mesh, torch.device("cpu")).parts[0]
    randomize_adapters(model)
    return model.eval()


def generate_records(model: torch.nn.Module, prompts: list[list[int]], params: dict) -> list[dict]:
    """The native sampler's completions as plain dicts."""
    sampler = NativeSampler(model, lambda ids: " ".join(map(str, ids)), 0, torch.device("cpu"))
    return [{"tokens": c.token_ids, "logprobs": c.logprobs, "finish": c.finish_reason}
            for c in sampler.generate(prompts, SamplingParams(**params))]


def generate_on_rank(rank: int, cfg_dict: dict, prompts: list[list[int]], runs: list[dict], out_file: str) -> None:
    """Every rank generates the same requests; rank 0 writes the results of every run."""
    model = build_sampler_model(cfg_dict)
    results = [generate_records(model, prompts, params) for params in runs]
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))
