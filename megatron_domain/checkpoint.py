"""Checkpoints with torch.distributed.checkpoint (DCP): model and optimizer state as DCP
shards, plus the training position (step, scheduler, the stage's data cursor) and per-rank
RNG states. A checkpoint directory appears only when complete: it is written as
`step_XXXXXXX.tmp` and renamed; `latest` is replaced atomically after that.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

from megatron_domain.models.lora import is_adapter_param

EXTRA_FILE = "extra.json"


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict:
    """Python, numpy, torch CPU and CUDA generator states of this process, as tensors and plain
    numbers only, so that `load_rng_state` can read them with `weights_only=True` (a pickled
    state in a checkpoint received from elsewhere could run code when loaded)."""
    py_version, py_words, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python_version": py_version, "python_words": torch.tensor(py_words, dtype=torch.int64),
             "python_gauss": py_gauss, "numpy_name": np_name,
             "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)), "numpy_pos": int(np_pos),
             "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    random.setstate((state["python_version"], tuple(state["python_words"].tolist()), state["python_gauss"]))
    np.random.set_state((state["numpy_name"], state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rng_state(path: Path) -> dict:
    """Read an RNG state file with `weights_only=True`: tensors and plain data, never code."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: refused to load: the file holds Python objects besides tensors and plain data, and "
                         "unpickling them could run code. Checkpoints of this version store RNG states as tensors; "
                         "if this checkpoint is an old one of your own, delete its rng_rank*.pt files to resume "
                         f"without restoring the random generators ({str(err).splitlines()[0]})") from None


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
    # one process: no_dist. Measured (torch 2.13, CPU, a gloo group of one): after a dcp.save
    # through the process group, every later fp32 matmul of the process ran 1.5x slower (a
    # 512 x 128 x 384 mm 135 -> 200 us) and the next stage's sampling 2.7x (a DPO round 1.5 ->
    # 4.0 s); without the group's collectives it stays at 135 us. The cause inside DCP is not found
    with warnings.catch_warnings():  # no_dist's "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.save(state, checkpoint_id=str(tmp), no_dist=_world_size() == 1)
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


def saved_step(checkpoint: Path) -> int:
    """The training step a complete checkpoint directory was written at."""
    return int(json.loads((checkpoint / EXTRA_FILE).read_text())["step"])


def saved_steps(run_dir: str | os.PathLike) -> list[int]:
    """The steps of the complete checkpoint directories of a run, ascending."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(int(p.name[len("step_"):]) for p in root.glob("step_*")
                  if p.is_dir() and p.name[len("step_"):].isdigit())


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> list[int]:
    """Delete all but the newest `keep_last` complete checkpoints (0: keep all; rank 0 only),
    and what a killed run left half-written or half-deleted. Called after a checkpoint is
    complete (no write in progress), so the newest one is never at risk; the one `latest`
    points to is always kept. Returns the deleted steps."""
    if _rank() != 0:
        return []
    root = checkpoint_dir(run_dir)
    for leftover in [*root.glob("step_*.deleting"), *root.glob("step_*.tmp")]:  # of a run killed mid-way
        shutil.rmtree(leftover, ignore_errors=True)
    if keep_last <= 0:
        return []
    latest = latest_checkpoint(run_dir)
    steps = [s for s in saved_steps(run_dir) if (root / f"step_{s:07d}" / EXTRA_FILE).is_file()]
    doomed = [s for s in steps[:-keep_last] if latest is None or root / f"step_{s:07d}" != latest]
    for step in doomed:  # renamed first: a kill during the removal leaves no half checkpoint under a step name
        aside = root / f"step_{step:07d}.deleting"
        os.replace(root / f"step_{step:07d}", aside)
        shutil.rmtree(aside)
    return doomed


def prepare_run_dir(run_dir: str | os.PathLike, resume: bool, overwrite: bool) -> Path:
    """Make `run_dir` ready for a run. A new run (not `resume`) refuses a directory that already
    holds checkpoints: it would mix its metrics and checkpoints with the old run's. With
    `overwrite` the old directory is moved aside (to `<run_dir>.old-<time>`), never deleted.
    Only rank 0 moves; returns the directory."""
    run_dir = Path(run_dir)
    steps = [] if resume else saved_steps(run_dir)
    if steps and not overwrite:
        raise FileExistsError(
            f"train.run_dir {run_dir} already holds a run (checkpoints up to step {steps[-1]}); a new run there would "
            "mix with it. Pass --resume to continue it, choose another directory (--set train.run_dir=...), or pass "
            "--overwrite to move the old run aside")
    if steps and _rank() == 0:
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(run_dir, aside)
        print(f"--overwrite: moved the previous run in {run_dir} to {aside}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint); clear error otherwise.
    Its DCP metadata is checked to hold only checkpoint metadata before anything reads it."""
    path = Path(path)
    if not (path / EXTRA_FILE).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint found at {path}: expected a checkpoint directory (with "
                                    f"{EXTRA_FILE}) or a run directory with checkpoints/latest")
        path = latest
    check_metadata_is_data(path / ".metadata")
    return path


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata, refusing every global that is not one of its plain data classes."""

    def find_class(self, module: str, name: str):
        allowed = (module == "torch.distributed.checkpoint.metadata"
                   or (module, name) in SAFE_METADATA_GLOBALS
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not part of checkpoint metadata")
        return super().find_class(module, name)


SAFE_METADATA_GLOBALS = frozenset({
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict")})


def check_metadata_is_data(metadata_file: Path) -> None:
    """DCP reads `.metadata` with plain pickle, which can run code from a crafted file: unpickle
    it first with only DCP's metadata classes allowed, and refuse the checkpoint otherwise."""
    if not metadata_file.is_file():
        raise FileNotFoundError(f"{metadata_file.parent}: not a complete checkpoint (no {metadata_file.name}); "
                                "point at a checkpoint directory written by `mdt train` or `mdt convert`")
    try:
        with open(metadata_file, "rb") as handle:
            _MetadataUnpickler(handle).load()
    except (pickle.UnpicklingError, AttributeError, EOFError, ValueError) as err:
        raise ValueError(f"{metadata_file}: refused to load the checkpoint: {err}. A DCP metadata file holds only "
                         "tensor shapes, dtypes and offsets; this one could run code when read. Use a checkpoint "
                         "you wrote yourself or received from a trusted source") from None


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
        set_rng_state(load_rng_state(rng_file))
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


def check_checkpoint_model(model_cfg, path: str | os.PathLike, role: str) -> None:
    """Refuse to load `path` (a checkpoint, run or hf: folder) into a model whose config differs
    from the one it was written with in a shape or semantics field; the error names the file,
    every differing field and the fix."""
    from megatron_domain.config import model_config_differences

    differences = model_config_differences(model_cfg, str(path))
    if differences:
        raise ValueError(f"{role} {path}: the checkpoint was written with another model config: "
                         f"{'; '.join(differences)}. Use the checkpoint's model config (leave out model.preset to "
                         "read it from there, or make these keys match)")


def load_initial_weights(init_from: str, parts: list[torch.nn.Module], model_cfg) -> None:
    """`model.init_from`: a checkpoint or run directory of ours (a LoRA run's: its base with
    its adapters merged), or `hf:<folder>` (a Hugging Face model folder, read slice by slice
    for this rank's layout)."""
    from megatron_domain.models.hf import HF_PREFIX, load_hf_weights
    from megatron_domain.models.llama import canonical_name, copy_full_tensor

    check_checkpoint_model(model_cfg, init_from, "model.init_from")
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
