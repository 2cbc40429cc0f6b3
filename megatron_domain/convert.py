"""`mdt convert`: Hugging Face folders <-> our DCP checkpoints, each conversion proven by logits.

    mdt convert hf-to-mdt /models/Llama-3.1-8B ckpt/llama3.1-8b [--dtype fp32]
    mdt convert mdt-to-hf runs/dacpt ckpt/hf-export [--dtype bf16] [--max-shard-size 5GB]

Import writes a checkpoint directory usable as `model.init_from` (plus `model.yaml`, usable
as `model.preset`, and the tokenizer files under `tokenizer/`). Export writes standard
sharded safetensors with the index, `config.json`, `generation_config.json` and the tokenizer
files, through transformers' own `save_pretrained`. The export of a chat-trained run (sft and
the later modes) serves as a chat model: its `tokenizer_config.json` carries the run's chat
template and end-of-turn token as `eos_token`, and `generation_config.json` stops at the end of
turn and at the end of document (what `apply_chat_template`, `generate` and vLLM's chat API
read). Both keep the source dtype unless
`--dtype` says otherwise, write to a temporary name and rename only after the verification:
a few fixed prompts through our model and through transformers on CPU in fp32; a max logit
difference above tolerance is an error and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from megatron_domain.checkpoint import (
    EXTRA_FILE, load_initial_weights, load_model_weights, resolve_checkpoint, stored_dtype)
from megatron_domain.config import CHAT_MODES, LoraConfig, ModelConfig, config_from_dict, load_yaml, model_config_from_dict
from megatron_domain.models.hf import (
    HF_PREFIX, HFCheckpointError, copy_tokenizer_files, hf_config_from_model, hf_name, model_config_dict, model_config_from_hf,
    our_name, read_hf_config, safetensors_files)
from megatron_domain.models.llama import Transformer, build_model, materialize
from megatron_domain.models.lora import apply_lora, is_adapter_param, merge_lora
from megatron_domain.parallel.distributed import ensure_process_group
from megatron_domain.rollout.export import (
    gathered_state_dict, replace_dir, source_generation_config, write_peft_adapter, write_serving_files, write_token_ids)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VERIFY_TOLERANCE = 1e-4  # max |logit difference|, relative to max(1, max |logit|), both in fp32


def _load_our_model(cfg: ModelConfig, checkpoint: Path, through: torch.dtype | None = None) -> Transformer:
    """Our model in fp32 on CPU with the checkpoint's weights (optionally rounded through
    `through`, the dtype an export writes)."""
    model = materialize(build_model(cfg), torch.device("cpu"), seed=None)
    load_model_weights(checkpoint, model)
    if through is not None:
        round_through(model, through)
    return model.eval()


@torch.no_grad()
def round_through(model: Transformer, dtype: torch.dtype) -> None:
    """Round the base weights (not LoRA adapters) to `dtype` and back, so our fp32 model
    holds exactly what an export in `dtype` holds."""
    if dtype == torch.float32:
        return
    for name, param in model.named_parameters():
        if not is_adapter_param(name):
            param.copy_(param.to(dtype).float())


def verify_logits(model: Transformer, hf_folder: Path, num_prompts: int = 3, seq_len: int = 24, seed: int = 0,
                  adapter: Path | None = None) -> float:
    """Max |logits(ours) - logits(transformers [+ a peft adapter])| over fixed random prompts
    (fp32, CPU); raises when above VERIFY_TOLERANCE x max(1, max |logit|)."""
    import transformers

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        hf_model = PeftModel.from_pretrained(hf_model, str(adapter)).eval()
    seq_len = min(seq_len, model.cfg.max_seq_len)
    tokens = torch.randint(0, model.cfg.vocab_size, (num_prompts, seq_len),
                           generator=torch.Generator().manual_seed(seed))  # [P, S]
    positions = torch.arange(seq_len).expand(num_prompts, seq_len)  # [P, S]
    with torch.no_grad():
        ours = model(tokens, positions)  # [P, S, V]
        theirs = hf_model(input_ids=tokens).logits.float()  # [P, S, V]
    diff = (ours - theirs).abs().max().item()
    limit = VERIFY_TOLERANCE * max(1.0, theirs.abs().max().item())
    if not diff <= limit:
        raise HFCheckpointError(f"verification failed: max logit difference {diff:.3g} between our model and "
                                f"transformers on {hf_folder} exceeds {limit:.3g}; the conversion is wrong")
    return diff


def _run_data(checkpoint: Path, config: str | None) -> tuple[str, str]:
    """(chat template name or "" for a non-chat run, data.eod_token) of the run that wrote `checkpoint`."""
    if config:
        data = load_yaml(config)
    else:
        run_config = checkpoint.parent.parent / "config.json"
        data = json.loads(run_config.read_text()) if run_config.is_file() else {}
    section = data.get("data") or {}
    template = (section.get("chat") or {}).get("template", "chatml") if data.get("mode") in CHAT_MODES else ""
    return template, section.get("eod_token", "")


def _run_lora(checkpoint: Path, config: str | None) -> tuple[LoraConfig, str]:
    """(lora settings, model.init_from) of the run that wrote `checkpoint`."""
    if config:
        cfg = config_from_dict(load_yaml(config), source=config)
        return cfg.lora, cfg.model.init_from
    run_config = checkpoint.parent.parent / "config.json"
    if run_config.is_file():
        data = json.loads(run_config.read_text())
        lora = data.get("lora") or {}
        return LoraConfig(**lora), data.get("model", {}).get("init_from", "")
    return LoraConfig(), ""


def _load_lora_model(cfg: ModelConfig, lora: LoraConfig, init_from: str, checkpoint: Path) -> Transformer:
    """Base (`init_from`) + the checkpoint's adapters, fp32 on CPU, not merged."""
    if not init_from:
        raise FileNotFoundError(f"{checkpoint}: a LoRA checkpoint holds only adapters, and the run's model.init_from "
                                "(its base) is unknown; pass --config with the run's config")
    model = build_model(cfg)
    apply_lora(model, lora.rank, lora.scale_alpha, 0.0, tuple(lora.targets))
    model = materialize(model, torch.device("cpu"), seed=None)
    load_initial_weights(init_from, [model], cfg)
    load_model_weights(checkpoint, [model], adapters_only=True)
    return model.eval()


def export_peft_adapter(model: Transformer, lora: LoraConfig, base: str, dst: Path, verify: bool) -> dict:
    """adapter_config.json + adapter_model.safetensors that `peft` loads onto the HF base."""
    tmp = staging_dir(dst)
    try:
        write_peft_adapter(tmp, gathered_state_dict(model), lora, base)
        summary = {"export": str(dst), "kind": "peft_adapter", "base": base,
                   "files": sorted(p.name for p in tmp.iterdir())}
        if verify:
            summary["max_logit_diff"] = verify_logits(model, Path(base), adapter=tmp)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, dst)
    return summary


def _run_model_config(checkpoint: Path, config: str | None) -> ModelConfig:
    """The model config of a checkpoint: `--config`, else the run's config.json, else the
    model.yaml written by an import."""
    if config:
        return config_from_dict(load_yaml(config), source=config).model
    model_yaml, run_config = checkpoint / "model.yaml", checkpoint.parent.parent / "config.json"
    if model_yaml.is_file():
        return model_config_from_dict(load_yaml(model_yaml), str(model_yaml))
    if run_config.is_file():
        model = json.loads(run_config.read_text())["model"]
        return model_config_from_dict({k: v for k, v in model.items() if k not in ("preset", "init_from")},
                                      str(run_config))
    raise FileNotFoundError(f"{checkpoint}: cannot find the model config (no model.yaml, no run config.json two "
                            "levels up); pass --config RUN_CONFIG.yaml")


def check_destination(dst: Path, sources: list[Path], overwrite: bool) -> None:
    """Refuse a destination that would destroy data: the source itself or a folder holding it
    (always), a folder inside the source, or a non-empty folder (both unless `overwrite`; the
    old destination is then replaced only after the new one is verified)."""
    target = dst.resolve()
    for source in sources:
        origin = source.resolve()
        if target == origin or origin.is_relative_to(target):
            raise ValueError(f"destination {dst}: it is (or contains) the source {source}; replacing it would delete "
                             "the source. Choose a destination outside the source")
        if target.is_relative_to(origin) and not overwrite:
            raise ValueError(f"destination {dst} is inside the source {source}; choose a folder outside it, or pass "
                             "--overwrite if writing there is intended")
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"destination {dst} exists and is not empty; choose a new or empty folder, or pass "
                              "--overwrite to replace it (its old contents are removed once the new export is verified)")


def staging_dir(dst: Path) -> Path:
    """A new, uniquely named folder next to `dst` to build the output in before renaming it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))


def hf_to_mdt(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None, verify: bool = True,
              overwrite: bool = False) -> dict:
    """Import an HF folder as a DCP checkpoint directory at `dst`; returns a summary."""
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open

    src, dst = Path(src), Path(dst)
    check_destination(dst, [src], overwrite)
    cfg = model_config_from_hf(read_hf_config(src), str(src / "config.json"))
    files = safetensors_files(src)
    ensure_process_group(torch.device("cpu"))
    wanted = {hf_name(k) for k in build_model(cfg).state_dict()}
    missing = sorted(wanted - set(files))
    if missing:
        raise HFCheckpointError(f"{src}: tensor {missing[0]} is missing ({len(missing)} missing)")
    state: dict[str, torch.Tensor] = {}
    for path in sorted(set(files.values())):  # shard by shard
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key in wanted:
                    tensor = handle.get_tensor(key)
                    state[our_name(key)] = tensor.to(DTYPES[dtype]) if dtype else tensor
    source_dtype = str(next(iter(state.values())).dtype).replace("torch.", "")
    tmp = staging_dir(dst)
    dcp.save({"model": state}, checkpoint_id=str(tmp))
    (tmp / EXTRA_FILE).write_text(json.dumps({"step": 0, "source": f"hf:{src}", "dtype": source_dtype}, indent=2))
    import yaml

    (tmp / "model.yaml").write_text(yaml.safe_dump(model_config_dict(cfg), sort_keys=False))
    (tmp / "tokenizer").mkdir()
    tokenizer_files = copy_tokenizer_files(src, tmp / "tokenizer")
    source_generation_config(src).save_pretrained(str(tmp))  # its token ids and sampling defaults, for exports
    summary = {"source": str(src), "checkpoint": str(dst), "architecture": cfg.hf_architecture,
               "dtype": source_dtype, "tensors": len(state), "tokenizer_files": tokenizer_files}
    if verify:
        try:
            summary["max_logit_diff"] = verify_logits(_load_our_model(cfg, tmp), src)
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    replace_dir(tmp, dst)
    return summary


def mdt_to_hf(src: str | os.PathLike, dst: str | os.PathLike, config: str | None = None,
              tokenizer: str | None = None, dtype: str | None = None, max_shard_size: str = "5GB",
              verify: bool = True, lora_export: str = "merge", overwrite: bool = False) -> dict:
    """Export a checkpoint (or a run's latest) as an HF folder at `dst`; returns a summary.
    A LoRA run's checkpoint is merged into its base (`lora_export="merge"`) or written as a
    PEFT adapter for the run's HF base (`"adapter"`, needs model.init_from: hf:<folder>)."""
    import transformers

    ensure_process_group(torch.device("cpu"))
    checkpoint = resolve_checkpoint(src)
    check_destination(Path(dst), [Path(src), checkpoint], overwrite)
    cfg = _run_model_config(checkpoint, config)
    lora, init_from = _run_lora(checkpoint, config)
    out_dtype = DTYPES[dtype] if dtype else stored_dtype(checkpoint)
    if lora.rank > 0:
        model = _load_lora_model(cfg, lora, init_from, checkpoint)
        if lora_export == "adapter":
            if not init_from.startswith(HF_PREFIX):
                raise ValueError("--lora adapter: the run's base must be an HF folder (model.init_from: hf:<folder>) "
                                 "for peft to load the adapter onto; use --lora merge")
            return export_peft_adapter(model, lora, init_from[len(HF_PREFIX):], Path(dst), verify)
        merge_lora(model)
        round_through(model, out_dtype)
        model = _without_adapters(model, cfg)
    else:
        model = _load_our_model(cfg, checkpoint, through=out_dtype)
    hf_cfg = hf_config_from_model(cfg, out_dtype)
    state = {hf_name(k): v.detach().to(out_dtype).clone() for k, v in model.state_dict().items()}
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=out_dtype)
    result = hf_model.load_state_dict(state, strict=False, assign=True)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise HFCheckpointError(f"export: parameter names do not match {hf_cfg.architectures[0]}: "
                                f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    if cfg.tie_embeddings:
        hf_model.tie_weights()
    tmp = staging_dir(Path(dst))
    try:
        summary = _write_export(hf_model, hf_cfg, model, cfg, checkpoint, config, tokenizer, out_dtype, max_shard_size,
                                tmp, verify)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, Path(dst))
    return {"export": str(dst), **summary}


def _write_export(hf_model, hf_cfg, model: Transformer, cfg: ModelConfig, checkpoint: Path, config: str | None,
                  tokenizer: str | None, out_dtype: torch.dtype, max_shard_size: str, tmp: Path, verify: bool) -> dict:
    """Write the HF folder of `mdt_to_hf` into `tmp` and verify it; returns the summary."""
    hf_model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
    tokenizer_src = tokenizer or _tokenizer_source(checkpoint)
    tokenizer_files = copy_tokenizer_files(tokenizer_src, tmp) if tokenizer_src else []
    source = inherited_generation_config(checkpoint)
    if "tokenizer.json" in tokenizer_files:
        template_name, eod_token = _run_data(checkpoint, config)
        serving = write_serving_files(tmp, tokenizer_src, template_name, eod_token, cfg.max_seq_len, source)
        tokenizer_files = sorted(set(tokenizer_files) | {"tokenizer_config.json"})
    else:  # no tokenizer to check ids against: the source model's, else none (never transformers' 1 / 2)
        ids = {key: getattr(source, key, None) if source is not None else None
               for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
        write_token_ids(tmp, ids, source)
        serving = {"eos_token_id": ids["eos_token_id"],
                   "warning": "no tokenizer found (pass --tokenizer): special token ids "
                              + ("taken from the source model" if source is not None else "unknown")}
    summary = {"checkpoint": str(checkpoint), "architecture": hf_cfg.architectures[0],
               "dtype": str(out_dtype).replace("torch.", ""), "tokenizer_files": tokenizer_files, **serving,
               "files": sorted(p.name for p in tmp.iterdir())}
    if verify:
        summary["max_logit_diff"] = verify_logits(model, tmp)
    return summary


def _without_adapters(model: Transformer, cfg: ModelConfig) -> Transformer:
    """A plain model holding `model`'s (merged) base weights."""
    plain = materialize(build_model(cfg), torch.device("cpu"), seed=None)
    state = {k: v for k, v in model.state_dict().items() if not is_adapter_param(k)}
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def inherited_generation_config(checkpoint: Path, depth: int = 0):
    """The generation config of the HF model a checkpoint descends from: the one an import
    stored beside it, else (following the run's model.init_from) its base's; None for a model
    trained from scratch."""
    if (checkpoint / "generation_config.json").is_file():
        return source_generation_config(checkpoint)
    run_config = checkpoint.parent.parent / "config.json"
    init_from = (json.loads(run_config.read_text()).get("model") or {}).get("init_from") if run_config.is_file() else ""
    if not init_from or depth > 16:
        return None
    if init_from.startswith(HF_PREFIX):
        return source_generation_config(init_from[len(HF_PREFIX):])
    return inherited_generation_config(resolve_checkpoint(init_from), depth + 1)


def _tokenizer_source(checkpoint: Path) -> str | None:
    """The tokenizer an import carried along, or the run config's data.tokenizer."""
    if (checkpoint / "tokenizer").is_dir():
        return str(checkpoint / "tokenizer")
    run_config = checkpoint.parent.parent / "config.json"
    if run_config.is_file():
        tok = json.loads(run_config.read_text()).get("data", {}).get("tokenizer")
        if tok and Path(tok).exists():
            return tok
    return None
