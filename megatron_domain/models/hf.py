"""Hugging Face adapter: config and weight-name mapping for LlamaForCausalLM (incl. Llama 3.1
RoPE scaling), Qwen2ForCausalLM (q/k/v biases, tied embeddings) and MistralForCausalLM, and
safe reading of (sharded) safetensors folders.

Our parameter names are HF's without the `model.` prefix (the output layer keeps
`lm_head.weight`), so the weight map is a rename. Reading goes through
`torch.distributed.checkpoint.HuggingFaceStorageReader`: DCP plans which slice of which
tensor every rank needs, so a TP/PP/FSDP rank reads only its own slices, shard file by shard
file, and nobody materializes the whole model. transformers is imported lazily (export only).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import fields
from pathlib import Path

import torch

from megatron_domain.config import HF_ARCHITECTURES as SUPPORTED_ARCHITECTURES, ModelConfig, RopeScalingConfig
from megatron_domain.models.lora import is_adapter_param

HF_PREFIX = "hf:"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")


class HFCheckpointError(ValueError):
    """A Hugging Face folder that cannot be read as a supported model (names the file and fix)."""


# --------------------------------------------------------------------------- names


def hf_name(ours: str) -> str:
    """Our parameter name -> the HF checkpoint's (`layers.0...` -> `model.layers.0...`)."""
    return ours if ours.startswith("lm_head.") else f"model.{ours}"


def our_name(hf: str) -> str:
    """HF checkpoint name -> ours (inverse of `hf_name`)."""
    return hf[len("model."):] if hf.startswith("model.") else hf


# --------------------------------------------------------------------------- configs


def read_hf_config(folder: str | os.PathLike) -> dict:
    """config.json of an HF model folder; unsupported architectures are an error."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise HFCheckpointError(f"{folder}: no config.json; expected a Hugging Face model folder "
                                "(config.json + *.safetensors)")
    config = json.loads(path.read_text())
    archs = config.get("architectures") or []
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise HFCheckpointError(f"{path}: architecture {archs or config.get('model_type')!r} is not supported; "
                                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return config


def _rope(config: dict, where: str) -> tuple[float, RopeScalingConfig]:
    """(rope_theta, scaling) from either the classic (`rope_theta`, `rope_scaling`) or the
    transformers-5 (`rope_parameters`) layout."""
    params = config.get("rope_parameters") or {}
    # transformers 5 reads rope_parameters and ignores a top-level rope_theta beside it
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind in ("default", None):
        return float(theta), RopeScalingConfig()
    if kind != "llama3":
        raise HFCheckpointError(f"{where}: rope scaling type {kind!r} is not supported (supported: default, llama3)")
    return float(theta), RopeScalingConfig(
        type="llama3", factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))


def model_config_from_hf(config: dict, where: str = "config.json") -> ModelConfig:
    """Our ModelConfig for an HF config dict. A Mistral sliding window shorter than the
    context caps `max_seq_len` (our attention is full: equal up to the window)."""
    arch = config["architectures"][0]
    if config.get("mlp_bias") or (arch != "Qwen2ForCausalLM" and config.get("attention_bias")):
        raise HFCheckpointError(f"{where}: attention_bias / mlp_bias (biases on o_proj or the MLP) are not "
                                "supported; only Qwen2's q/k/v biases are")
    if config.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(f"{where}: hidden_act {config.get('hidden_act')!r} is not supported (silu only)")
    theta, scaling = _rope(config, where)
    max_seq = int(config.get("max_position_embeddings", 2048))
    window = config.get("sliding_window") if arch == "MistralForCausalLM" or config.get("use_sliding_window") else None
    if window:
        max_seq = min(max_seq, int(window))
    heads = int(config["num_attention_heads"])
    return ModelConfig(
        vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]), num_layers=int(config["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or 0), max_seq_len=max_seq, rope_theta=theta, rope_scaling=scaling,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), qkv_bias=arch == "Qwen2ForCausalLM",
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), hf_architecture=arch)


def hf_architecture(cfg: ModelConfig) -> str:
    """The HF class to export as: `model.hf_architecture`, else Qwen2 when q/k/v have biases,
    else Llama."""
    arch = cfg.hf_architecture or ("Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM")
    if cfg.qkv_bias and arch != "Qwen2ForCausalLM":
        raise HFCheckpointError(f"model.qkv_bias=true cannot be exported as {arch} (whose attention_bias also "
                                "adds an o_proj bias); export as Qwen2ForCausalLM")
    return arch


def hf_config_from_model(cfg: ModelConfig, dtype: torch.dtype, extra: dict | None = None):
    """A transformers config object for `cfg` (written with the installed transformers'
    own serializer, so it loads there and in vLLM)."""
    import transformers

    arch = hf_architecture(cfg)
    kwargs = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.resolved_head_dim,
                  max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                  tie_word_embeddings=cfg.tie_embeddings, architectures=[arch], torch_dtype=dtype, **(extra or {}))
    if cfg.rope_scaling.type == "llama3":
        rs = cfg.rope_scaling
        kwargs["rope_scaling"] = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                                  "high_freq_factor": rs.high_freq_factor,
                                  "original_max_position_embeddings": rs.original_max_position_embeddings}
    if arch == "MistralForCausalLM":
        kwargs["sliding_window"] = None
    cls = {"LlamaForCausalLM": transformers.LlamaConfig, "Qwen2ForCausalLM": transformers.Qwen2Config,
           "MistralForCausalLM": transformers.MistralConfig}[arch]
    return cls(**kwargs)


def check_model_matches(cfg: ModelConfig, hf_cfg: ModelConfig, source: str) -> None:
    """The run's model config must have the HF model's shapes; names every mismatch."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
            "resolved_head_dim", "qkv_bias", "tie_embeddings", "rope_theta", "rope_scaling")
    problems = [f"model.{k.replace('resolved_', '')}: {getattr(cfg, k)!r} but {source} has {getattr(hf_cfg, k)!r}"
                for k in keys if getattr(cfg, k) != getattr(hf_cfg, k)]
    if problems:
        raise HFCheckpointError(f"the model config does not match {source}: " + "; ".join(problems)
                                + ". Use the HF folder's shapes (e.g. `mdt convert hf-to-mdt` writes a model.yaml "
                                "to use as model.preset)")


def model_config_dict(cfg: ModelConfig) -> dict:
    """ModelConfig as a plain dict for model.yaml (usable as `model.preset: <path>`)."""
    out = {}
    for f in fields(cfg):
        if f.name in ("preset", "init_from"):
            continue
        value = getattr(cfg, f.name)
        out[f.name] = {g.name: getattr(value, g.name) for g in fields(value)} if f.name == "rope_scaling" else value
    return out


# --------------------------------------------------------------------------- safetensors files


def _header(path: Path) -> tuple[dict, int]:
    """(safetensors header, expected file size); clear error when the file is cut short."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise HFCheckpointError(f"{path}: truncated ({size} bytes, no safetensors header); re-download it")
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise HFCheckpointError(f"{path}: truncated (header claims {length} bytes, file has {size}); "
                                    "re-download it")
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise HFCheckpointError(f"{path}: corrupt safetensors header ({exc}); re-download it") from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return header, 8 + length + end


def safetensors_files(folder: str | os.PathLike) -> dict[str, Path]:
    """{tensor name: file} of an HF folder, after checking that every shard the index names
    exists and is complete."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise HFCheckpointError(f"{folder}: {len(missing)} shard(s) named in {INDEX_FILE} are missing: "
                                    f"{', '.join(missing)}; download them again")
    elif (folder / SINGLE_FILE).is_file():
        files, weight_map = [SINGLE_FILE], None
    else:
        raise HFCheckpointError(f"{folder}: no {INDEX_FILE} or {SINGLE_FILE} (only safetensors weights are "
                                "supported; convert .bin checkpoints with transformers first)")
    names: dict[str, Path] = {}
    for file in files:
        path = folder / file
        header, expected = _header(path)
        if path.stat().st_size < expected:
            raise HFCheckpointError(f"{path}: truncated ({path.stat().st_size} of {expected} bytes); re-download it")
        for key in header:
            if key != "__metadata__":
                names[key] = path
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(names))
        if absent:
            raise HFCheckpointError(f"{folder}: {len(absent)} tensor(s) listed in {INDEX_FILE} are not in the "
                                    f"shards, e.g. {absent[0]}")
    return names


def load_hf_weights(folder: str | os.PathLike, parts: list[torch.nn.Module], cfg: ModelConfig) -> None:
    """Load an HF folder into this rank's model parts (any parallel layout). Every rank reads
    only the slices it holds; dtypes are cast to the parameters' (bf16 -> fp32 exactly)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    folder = Path(folder)
    check_model_matches(cfg, model_config_from_hf(read_hf_config(folder), str(folder / "config.json")), str(folder))
    available = safetensors_files(folder)
    options = StateDictOptions(strict=True)
    for part in parts:
        state = {k: v for k, v in get_model_state_dict(part, options=options).items()
                 if not is_adapter_param(k)}  # adapters are not part of an HF base
        missing = [k for k in state if hf_name(k) not in available]
        if missing:
            raise HFCheckpointError(f"{folder}: tensor {hf_name(missing[0])} is missing ({len(missing)} missing)")
        renamed = {hf_name(k): v for k, v in state.items()}
        dcp.load(renamed, storage_reader=HuggingFaceStorageReader(str(folder)))
        set_model_state_dict(part, {our_name(k): v for k, v in renamed.items()}, options=StateDictOptions(strict=False))


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files (and chat template) of a folder unchanged; returns their names.
    `src` may also be a single tokenizer.json."""
    import shutil

    src, dst = Path(src), Path(dst)
    if src.is_file():
        shutil.copy2(src, dst / src.name)
        return [src.name]
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
