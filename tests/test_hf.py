"""Hugging Face conversion, proven by logits (tiny random models built with transformers, no
downloads): import -> our logits equal transformers'; export -> tensors bitwise equal to the
source and transformers loads the export with the same logits; an HF folder loads directly
at tp=2; broken folders fail clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from megatron_domain.config import model_config_from_dict
from megatron_domain.convert import hf_to_mdt, mdt_to_hf
from megatron_domain.models.hf import HFCheckpointError, load_hf_weights
from megatron_domain.models.llama import build_model, materialize

from parallel_cases import parity_config_dict, run_job, run_jobs
from parallel_harness import run_on_ranks

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)
FAMILIES = {
    "llama_gqa_rope_scaling": (transformers.LlamaConfig, {
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64}}),
    "llama_mha": (transformers.LlamaConfig, {"num_key_value_heads": 4}),
    "qwen2_bias_tied": (transformers.Qwen2Config, {"tie_word_embeddings": True}),
    "mistral_gqa": (transformers.MistralConfig, {"sliding_window": None}),
}


def make_hf_model(folder: Path, family: str, dtype: torch.dtype = torch.float32, tokenizer: str | None = None,
                  shard: str = "150KB") -> Path:
    """A random tiny HF model saved as sharded safetensors (+ a tokenizer when given)."""
    cls, extra = FAMILIES[family]
    config = cls(**{**SHAPE, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # non-trivial biases and norms, so a dropped tensor would show
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(str(folder), max_shard_size=shard)
    if tokenizer:
        shutil.copy(tokenizer, folder / "tokenizer.json")
        (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return folder


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in `folder`."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_export_round_trip(family, tmp_path, corpora):
    src = make_hf_model(tmp_path / "hf", family, tokenizer=corpora["tokenizer"])
    assert len(list(src.glob("*.safetensors"))) > 1  # really sharded
    imported = hf_to_mdt(src, tmp_path / "ckpt")
    assert imported["max_logit_diff"] <= 1e-4
    # our model from the imported checkpoint vs transformers, on fresh random tokens
    model_cfg = model_config_from_dict({"preset": str(tmp_path / "ckpt" / "model.yaml")})
    ours = materialize(build_model(model_cfg), "cpu", seed=None)
    from megatron_domain.checkpoint import load_model_weights
    load_model_weights(tmp_path / "ckpt", ours)
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours_logits = ours.eval()(tokens, torch.arange(40).expand(2, 40))
    assert (ours_logits - hf_logits(src, tokens)).abs().max() <= 1e-4

    exported = mdt_to_hf(tmp_path / "ckpt", tmp_path / "export", max_shard_size="100KB")
    assert exported["max_logit_diff"] <= 1e-4
    out = tmp_path / "export"
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert (out / "tokenizer_config.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()
    source, result = all_tensors(src), all_tensors(out)
    assert sorted(source) == sorted(result)
    for name, tensor in source.items():
        assert result[name].dtype == tensor.dtype and torch.equal(result[name], tensor), name  # bitwise
    torch.testing.assert_close(hf_logits(out, tokens), hf_logits(src, tokens), rtol=0, atol=1e-6)
    assert not (tmp_path / "export.tmp").exists() and not (tmp_path / "ckpt.tmp").exists()


def test_bf16_source_keeps_its_dtype_and_fp32_is_explicit(tmp_path):
    src = make_hf_model(tmp_path / "hf", "llama_mha", dtype=torch.bfloat16)
    assert hf_to_mdt(src, tmp_path / "ckpt")["dtype"] == "bfloat16"
    assert mdt_to_hf(tmp_path / "ckpt", tmp_path / "same")["dtype"] == "bfloat16"
    source, same = all_tensors(src), all_tensors(tmp_path / "same")
    assert all(torch.equal(same[k], v) and same[k].dtype == torch.bfloat16 for k, v in source.items())
    assert mdt_to_hf(tmp_path / "ckpt", tmp_path / "fp32", dtype="fp32")["dtype"] == "float32"
    fp32 = all_tensors(tmp_path / "fp32")
    assert all(fp32[k].dtype == torch.float32 and torch.equal(fp32[k], v.float()) for k, v in source.items())


@pytest.mark.slow
def test_hf_folder_loads_directly_at_tp2(tmp_path, corpora):
    """`model.init_from: hf:<folder>` at tp=2 (2 processes, each reading its slices) gives the
    logits of the same folder loaded in one process, which equal transformers' (above)."""
    src = make_hf_model(tmp_path / "hf", "llama_mha")
    single = run_job("logits", parity_config_dict(corpora, tmp_path / "one", num_kv_heads=4), f"hf:{src}")
    jobs = [("tp2", "logits", parity_config_dict(corpora, tmp_path / "tp2", {"tp": 2}, num_kv_heads=4), f"hf:{src}"),
            ("pp2", "train", {**parity_config_dict(corpora, tmp_path / "pp2", {"pp": 2}, steps=1, num_kv_heads=4,
                                                   init_from=f"hf:{src}")}, None)]
    run_on_ranks(2, run_jobs, jobs, str(tmp_path))
    torch.testing.assert_close(torch.load(tmp_path / "tp2.pt"), single, rtol=0, atol=1e-5)
    one_step = run_job("train", parity_config_dict(corpora, tmp_path / "one_train", steps=1, num_kv_heads=4,
                                                   init_from=f"hf:{src}"))
    assert abs(torch.load(tmp_path / "pp2.pt")[0] - one_step[0]) <= 1e-5  # pp=2 ranks read their layers


def test_broken_folders_fail_clearly(tmp_path):
    src = make_hf_model(tmp_path / "hf", "llama_mha")
    shards = sorted(src.glob("*.safetensors"))
    cfg = model_config_from_dict({"preset": "tiny-test", "num_layers": 4, "num_kv_heads": 4})
    model = materialize(build_model(cfg), "cpu", seed=0)

    truncated = tmp_path / "truncated"
    shutil.copytree(src, truncated)
    data = shards[1].read_bytes()
    (truncated / shards[1].name).write_bytes(data[: len(data) // 2])
    with pytest.raises(HFCheckpointError, match=rf"{shards[1].name}: truncated .*re-download"):
        load_hf_weights(truncated, [model], cfg)

    missing = tmp_path / "missing"
    shutil.copytree(src, missing)
    (missing / shards[0].name).unlink()
    with pytest.raises(HFCheckpointError, match=rf"shard\(s\) named in model.safetensors.index.json are missing: "
                                                rf"{shards[0].name}"):
        hf_to_mdt(missing, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    unknown = tmp_path / "gpt2"
    shutil.copytree(src, unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(HFCheckpointError, match="GPT2LMHeadModel.*not supported; supported: LlamaForCausalLM, "
                                                "Qwen2ForCausalLM, MistralForCausalLM"):
        hf_to_mdt(unknown, tmp_path / "out")

    wrong_vocab = model_config_from_dict({"preset": "tiny-test", "num_layers": 4, "num_kv_heads": 4,
                                          "vocab_size": 1024})
    with pytest.raises(HFCheckpointError, match=r"model.vocab_size: 1024 but .* has 512"):
        load_hf_weights(src, [materialize(build_model(wrong_vocab), "cpu", seed=0)], wrong_vocab)


def test_lora_run_exports_merged_and_as_peft_adapter(tmp_path, corpora):
    """A LoRA run on an HF base exports (a) merged into the base, loadable by transformers,
    and (b) as a PEFT adapter that peft loads onto the HF base; both reproduce our
    base+adapter logits (the export verifies itself; checked again here)."""
    src = make_hf_model(tmp_path / "hf", "llama_mha", tokenizer=corpora["tokenizer"])
    cfg = parity_config_dict(corpora, tmp_path / "lora_run", steps=3, num_kv_heads=4, init_from=f"hf:{src}",
                             lora={"rank": 4, "dropout": 0.0, "targets": ["q_proj", "v_proj", "down_proj"]})
    run_job("train", cfg)
    merged = mdt_to_hf(tmp_path / "lora_run", tmp_path / "merged")
    adapter = mdt_to_hf(tmp_path / "lora_run", tmp_path / "adapter", lora_export="adapter")
    assert merged["max_logit_diff"] <= 1e-4 and adapter["max_logit_diff"] <= 1e-4
    assert sorted(adapter["files"]) == ["adapter_config.json", "adapter_model.safetensors"]
    assert len(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))) == 2 * 3 * 4
    from peft import PeftModel
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    with torch.no_grad():
        with_adapter = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(input_ids=tokens).logits
    torch.testing.assert_close(hf_logits(tmp_path / "merged", tokens), with_adapter, rtol=0, atol=1e-4)
    assert (with_adapter - hf_logits(src, tokens)).abs().max() > 1e-3  # the adapter changed something
