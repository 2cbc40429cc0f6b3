"""The policy as a Hugging Face model folder that inference engines serve (vLLM, transformers,
TGI): weights under HF names, `config.json`, the tokenizer, and the files that make a
chat-trained model behave as one (`tokenizer_config.json` with the run's chat template and
end-of-turn token, `generation_config.json` stopping there), plus LoRA adapters in PEFT's
format. Used by `mdt convert mdt-to-hf` (from a checkpoint) and by the vLLM rollout backend
(from the live model, at every weight sync). Folders are written under a temporary name and
renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from megatron_domain.config import LoraConfig, ModelConfig
from megatron_domain.data.chat import load_template
from megatron_domain.data.tokenizer import load_tokenizer
from megatron_domain.models.hf import HFCheckpointError, copy_tokenizer_files, hf_config_from_model, hf_name
from megatron_domain.models.llama import canonical_name
from megatron_domain.models.lora import is_adapter_param
from megatron_domain.rollout.prompts import stop_conditions


def gathered_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{our parameter name: full tensor on CPU} of a plain, tensor-parallel or FSDP model. Under
    a parallel layout every rank must call it (the shards are gathered collectively)."""
    state = {}
    for name, param in model.named_parameters():
        tensor = param.detach()
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        state[canonical_name(name)] = tensor.cpu()
    return state


def hf_weights(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The base weights of `state` (LoRA adapters left out) under HF names, contiguous, in `dtype`."""
    return {hf_name(k): (v.to(dtype) if dtype else v).contiguous() for k, v in state.items() if not is_adapter_param(k)}


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a completed temporary folder into place (replacing an older one)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_hf_folder(dst: str | os.PathLike, state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype,
                    tokenizer_src: str, template_name: str, eod_token: str = "") -> Path:
    """A servable HF folder at `dst` from our (full) state dict: model.safetensors, config.json,
    tokenizer files and serving files (see `write_serving_files`)."""
    from safetensors.torch import save_file

    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hf_config_from_model(cfg, dtype).save_pretrained(str(tmp))
    save_file(hf_weights(state, dtype), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    copy_tokenizer_files(tokenizer_src, tmp)
    write_serving_files(tmp, tokenizer_src, template_name, eod_token, cfg.max_seq_len)
    replace_dir(tmp, dst)
    return dst


def write_serving_files(folder: Path, tokenizer_src: str, template_name: str, eod_token: str,
                        max_seq_len: int, source_generation=None) -> dict:
    """Make the exported tokenizer and generation config those of the trained model:
    tokenizer_config.json (created when the tokenizer came as a bare tokenizer.json) gets the
    tokenizer class, pad and eos tokens and, for a chat run, the run's template and its
    end-of-turn token as eos; generation_config.json and config.json stop at the end of turn
    and at EOD. A non-chat export of a folder that had its own tokenizer_config.json keeps it.
    `source_generation` (a transformers GenerationConfig) is the one of the HF model the run
    descends from: its sampling defaults are kept, its eos ids are added to the stop tokens and
    its bos / pad ids are used, where they are special tokens of the tokenizer.
    Returns {"eos_token_id": [...], "chat_template": bool, "ignored_source_token_ids": {...}}."""
    tokenizer = load_tokenizer(folder, eod_token)
    eod = tokenizer.tokenizer.id_to_token(tokenizer.eod_id)
    template = load_template(template_name, tokenizer_src) if template_name else None
    eos_ids, stop_strings = stop_conditions(template, tokenizer)
    if stop_strings:
        raise HFCheckpointError(f"export: the chat template's end-of-turn marker {stop_strings[0]!r} is not one token "
                                f"of {tokenizer.source}; a served model could not stop at the end of its turn. "
                                "Add it to the tokenizer as a special token before training")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if template is not None or not config:
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.setdefault("model_max_length", max_seq_len)
        config.setdefault("clean_up_tokenization_spaces", False)
        config.setdefault("pad_token", eod)
        config["eos_token"] = eod if template is None else (template.end_of_turn or template.eos_token or eod)
        if template is not None:
            if template_name != "tokenizer":
                config["chat_template"] = template.source
                (folder / "chat_template.jinja").unlink(missing_ok=True)  # it would override the config's
            if template.bos_token:
                config["bos_token"] = template.bos_token
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    bos = config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    ids = {"eos_token_id": eos_ids, "pad_token_id": tokenizer.eod_id,
           "bos_token_id": tokenizer.tokenizer.token_to_id(bos) if bos else None}
    ignored: dict[str, list[int]] = {}
    if source_generation is not None:
        # ids of the source model, kept where they name special tokens of the tokenizer: a real
        # model's bos / eos / pad always are; transformers' defaults (bos 1, eos 2) in a folder
        # whose tokenizer differs name ordinary text (a quote) and would stop generation there
        special = {i for i, token in tokenizer.tokenizer.get_added_tokens_decoder().items() if token.special}
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            source_ids = _id_list(getattr(source_generation, key, None))
            kept = [i for i in source_ids if i in special]
            if len(kept) < len(source_ids):
                ignored[key] = [i for i in source_ids if i not in special]
            if key == "eos_token_id":
                ids[key] = list(dict.fromkeys(eos_ids + kept))
            elif kept:
                ids[key] = kept[0]
    write_token_ids(folder, ids, source_generation)
    out = {"eos_token_id": ids["eos_token_id"], "chat_template": template is not None}
    if ignored:
        out["ignored_source_token_ids"] = ignored
    return out


def _id_list(value) -> list[int]:
    """A token id, a list of them, or None, as a list."""
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def write_token_ids(folder: Path, ids: dict, source_generation=None) -> None:
    """Set bos / eos / pad ids in the folder's config.json and generation_config.json (both
    start from transformers' defaults, bos 1 / eos 2, which name arbitrary tokens of another
    vocabulary). generation_config.json starts from `source_generation` when given (keeping its
    sampling defaults)."""
    import copy

    import transformers

    model_config = transformers.AutoConfig.from_pretrained(str(folder))
    generation = (copy.deepcopy(source_generation) if source_generation is not None
                  else transformers.GenerationConfig.from_model_config(model_config))
    for key, value in ids.items():
        value = value[0] if isinstance(value, list) and len(value) == 1 else value
        setattr(model_config, key, value)
        setattr(generation, key, value)
    model_config.save_pretrained(str(folder))
    generation.save_pretrained(str(folder))


def source_generation_config(folder: str | os.PathLike):
    """The GenerationConfig of an HF model folder: its generation_config.json, else the one
    transformers derives from its config.json."""
    import transformers

    if (Path(folder) / "generation_config.json").is_file():
        return transformers.GenerationConfig.from_pretrained(str(folder))
    return transformers.GenerationConfig.from_model_config(transformers.AutoConfig.from_pretrained(str(folder)))


def peft_adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters of our state dict under PEFT's names
    (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    out = {}
    for name, tensor in state.items():
        if is_adapter_param(name):
            module, kind = name.rsplit(".", 1)
            peft = "lora_A" if kind == "lora_a" else "lora_B"
            out[f"base_model.model.{hf_name(module + '.weight')[: -len('.weight')]}.{peft}.weight"] = (
                tensor.detach().clone().contiguous())
    return out


def write_peft_adapter(dst: str | os.PathLike, state: dict[str, torch.Tensor], lora: LoraConfig, base: str) -> Path:
    """adapter_config.json + adapter_model.safetensors at `dst` that peft (and vLLM) load onto `base`."""
    from safetensors.torch import save_file

    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.scale_alpha,
              "lora_dropout": lora.dropout, "target_modules": list(lora.targets), "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base}
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(peft_adapter_state(state), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    replace_dir(tmp, dst)
    return dst
