"""Checkpoints with torch.distributed.checkpoint (DCP): model and optimizer state as DCP
shards, plus the training position (step, scheduler, the stage's data cursor) and per-rank
RNG states. A checkpoint directory appears only when complete: it is written as
`step_XXXXXXX.tmp` and renamed; `latest` is replaced atomically after that.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

from megatron_domain.models.lora import is_adapter_param

EXTRA_FILE = "extra.json"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict:
    """Python, numpy, torch CPU and CUDA generator states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _options(strict: bool = True, frozen: bool = False) -> StateDictOptions:
    # flattened optimizer state: keys are parameter names, so a checkpoint does not depend on
    # how parameters were split into pipeline chunks and optimizers; frozen parameters (a LoRA
    # run's base) are left out of training checkpoints: they come from model.init_from
    return StateDictOptions(flatten_optimizer_state_dict=True, strict=strict, ignore_frozen_params=not frozen)


def _model_states(parts: list[torch.nn.Module], frozen: bool = False) -> list[dict]:
    return [get_model_state_dict(part, options=_options(frozen=frozen)) for part in parts]


def _optimizer_states(parts: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer]) -> list[dict]:
    return [get_optimizer_state_dict(part, opt, options=_options()) for part, opt in zip(parts, optimizers)]


def _merge(states: list[dict]) -> dict:
    merged: dict = {}
    for state in states:
        merged.update(state)
    return merged


def save_checkpoint(run_dir: str | os.PathLike, step: int, parts: list[torch.nn.Module],
                    optimizers: list[torch.optim.Optimizer], extra: dict) -> Path:
    """Write checkpoint `step` atomically: model and optimizer state of every model part of
    every rank (DCP, keyed by parameter name), this rank's RNG, and `extra` (JSON-able:
    scheduler, data cursor, ...) from rank 0."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    _barrier()
    state = {"model": _merge(_model_states(parts)), "optim": _merge(_optimizer_states(parts, optimizers))}
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / EXTRA_FILE).write_text(json.dumps({"step": step, **extra}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / "latest")
    _barrier()
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_dir(run_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / EXTRA_FILE).is_file() else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint); clear error otherwise."""
    path = Path(path)
    if (path / EXTRA_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"no checkpoint found at {path}: expected a checkpoint directory (with {EXTRA_FILE}) "
                                "or a run directory with checkpoints/latest")
    return latest


def load_checkpoint(path: str | os.PathLike, parts: list[torch.nn.Module],
                    optimizers: list[torch.optim.Optimizer]) -> dict:
    """Restore model and optimizer state into this rank's parts (any parallel layout: DCP
    reshards by parameter name) and this rank's RNG; returns the `extra` dict."""
    path = resolve_checkpoint(path)
    model_states, optim_states = _model_states(parts), _optimizer_states(parts, optimizers)
    state = {"model": _merge(model_states), "optim": _merge(optim_states)}
    dcp.load(state, checkpoint_id=str(path))
    for part, opt, model_sd, optim_sd in zip(parts, optimizers, model_states, optim_states):
        set_model_state_dict(part, {k: state["model"][k] for k in model_sd}, options=_options(strict=False))
        set_optimizer_state_dict(part, opt, {k: state["optim"][k] for k in optim_sd}, options=_options())
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / EXTRA_FILE).read_text())


def load_model_weights(path: str | os.PathLike, parts: list[torch.nn.Module] | torch.nn.Module,
                       adapters_only: bool = False) -> Path:
    """Load the model weights of a checkpoint (or a run's latest) into `parts`: every base
    weight must be there; LoRA adapters are loaded when the checkpoint has them (else they keep
    their values, e.g. a fresh init on top of a DACPT base). `adapters_only`: load just the
    adapters (a LoRA run's checkpoint; the base comes from its model.init_from)."""
    from torch.distributed.checkpoint import FileSystemReader

    parts = parts if isinstance(parts, list) else [parts]
    path = resolve_checkpoint(path)
    stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    wanted = (lambda k: is_adapter_param(k)) if adapters_only else (lambda k: f"model.{k}" in stored or not is_adapter_param(k))
    model_states = [{k: v for k, v in sd.items() if wanted(k)} for sd in _model_states(parts, frozen=True)]
    state = {"model": _merge(model_states)}
    dcp.load(state, checkpoint_id=str(path))
    for part, model_sd in zip(parts, model_states):
        set_model_state_dict(part, {k: state["model"][k] for k in model_sd}, options=_options(strict=False))
    return path



def stored_dtype(path: str | os.PathLike) -> torch.dtype:
    """The dtype the model weights of a checkpoint were saved in (from the DCP metadata)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(resolve_checkpoint(path))).read_metadata().state_dict_metadata
    for key, item in metadata.items():
        if key.startswith("model.") and hasattr(item, "properties"):
            return item.properties.dtype
    raise FileNotFoundError(f"{path}: the checkpoint holds no model weights")


def holds_adapters_only(path: str | os.PathLike) -> bool:
    """Whether a checkpoint stores LoRA adapters and no base weights (a LoRA run's)."""
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(resolve_checkpoint(path))).read_metadata().state_dict_metadata
    model_keys = [k[len("model."):] for k in stored if k.startswith("model.")]
    return bool(model_keys) and all(is_adapter_param(k) for k in model_keys)


def merged_lora_run_weights(path: str | os.PathLike, model_cfg) -> dict[str, torch.Tensor]:
    """The full weights a LoRA run ends with: its base (its own model.init_from, recursively)
    plus its checkpoint's adapters, merged (W + scale B A), by parameter name, fp32 on CPU."""
    from megatron_domain.config import LoraConfig
    from megatron_domain.models.llama import build_model, materialize
    from megatron_domain.models.lora import apply_lora, merge_lora

    path = resolve_checkpoint(path)
    run_config = path.parent.parent / "config.json"
    data = json.loads(run_config.read_text()) if run_config.is_file() else {}
    base = (data.get("model") or {}).get("init_from", "")
    if not data.get("lora", {}).get("rank") or not base:
        raise FileNotFoundError(f"model.init_from={path}: the checkpoint holds only LoRA adapters and its run's "
                                f"config ({run_config}) does not name their base (model.init_from); export the "
                                "merged model with `mdt convert mdt-to-hf` and start from hf:<folder>")
    lora = LoraConfig(**data["lora"])
    model = build_model(model_cfg)
    apply_lora(model, lora.rank, lora.scale_alpha, 0.0, tuple(lora.targets))
    model = materialize(model, torch.device("cpu"), seed=None)
    load_initial_weights(base, [model], model_cfg)
    load_model_weights(path, [model], adapters_only=True)
    merge_lora(model)
    return {k: v for k, v in model.state_dict().items() if not is_adapter_param(k)}


def load_initial_weights(init_from: str, parts: list[torch.nn.Module], model_cfg) -> None:
    """`model.init_from`: a checkpoint or run directory of ours (a LoRA run's: its base with
    its adapters merged), or `hf:<folder>` (a Hugging Face model folder, read slice by slice
    for this rank's layout)."""
    from megatron_domain.models.hf import HF_PREFIX, load_hf_weights
    from megatron_domain.models.llama import canonical_name, copy_full_tensor

    if init_from.startswith(HF_PREFIX):
        load_hf_weights(init_from[len(HF_PREFIX):], parts, model_cfg)
    elif holds_adapters_only(init_from):
        merged = merged_lora_run_weights(init_from, model_cfg)
        with torch.no_grad():
            for part in parts:
                for name, param in part.named_parameters():
                    key = canonical_name(name)
                    if not is_adapter_param(key):
                        copy_full_tensor(param, merged[key])
    else:
        load_model_weights(init_from, parts)


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
