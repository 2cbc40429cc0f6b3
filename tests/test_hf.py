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


def llama3_style_source(folder: Path, corpora: dict) -> dict:
    """A tiny Llama whose tokenizer has Llama 3's special tokens and whose config.json and
    generation_config.json name them (plus sampling defaults), as a real HF folder does. Its
    output layer is set so that greedy decoding of PROMPT emits <|end_of_text|> at step 3."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(corpora["tokenizer"])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")])
    ids = {t: tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")}
    bos, eod, eot = ids["<|begin_of_text|>"], ids["<|end_of_text|>"], ids["<|eot_id|>"]
    config = transformers.LlamaConfig(**SHAPE, bos_token_id=bos, eos_token_id=eod)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    prompt = [bos] + tok.encode("the function returns a list").ids
    with torch.no_grad():
        tokens = list(prompt)
        for _ in range(2):  # greedy steps 1 and 2, then make step 3's choice the end of text
            tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
        hidden = model.model(input_ids=torch.tensor([tokens])).last_hidden_state[0, -3:]  # [3 steps, hidden]
        # the row whose logit is -50 at steps 1 and 2 and +50 at step 3 (least-norm solution)
        target = torch.tensor([[-50.0], [-50.0], [50.0]])
        model.lm_head.weight[eod] = torch.linalg.lstsq(hidden, target).solution[:, 0]
    model.save_pretrained(str(folder))
    tok.save(str(folder / "tokenizer.json"))
    transformers.GenerationConfig(bos_token_id=bos, eos_token_id=[eod, eot], do_sample=True, temperature=0.6,
                                  top_p=0.9).save_pretrained(str(folder))
    return {"bos": bos, "eod": eod, "eot": eot, "prompt": prompt}


def test_export_carries_the_source_token_ids_and_generation_config(tmp_path, corpora):
    """Import and export keep the source's bos / eos ids and sampling defaults (not transformers'
    bos 1 / eos 2), also for a run trained from the import; transformers' greedy `generate` on
    the export stops where the engine's generation stops."""
    from megatron_domain.config import config_from_dict
    from megatron_domain.data.tokenizer import load_tokenizer
    from megatron_domain.engine import train
    from megatron_domain.eval.harness import load_eval_model
    from megatron_domain.rollout.native import NativeSampler
    from megatron_domain.rollout.prompts import stop_conditions
    from megatron_domain.rollout.sampling import SamplingParams

    from conftest import tiny_config_dict

    source = llama3_style_source(tmp_path / "hf", corpora)
    hf_to_mdt(tmp_path / "hf", tmp_path / "ckpt")
    run = tiny_config_dict(corpora, tmp_path / "dacpt", steps=1)
    run["model"] = {"preset": str(tmp_path / "ckpt" / "model.yaml"), "init_from": str(tmp_path / "ckpt")}
    run["data"]["tokenizer"] = str(tmp_path / "hf" / "tokenizer.json")
    run["optim"].update(lr=1e-9, min_lr=1e-10)  # nearly the imported weights: the same greedy answer
    cfg = config_from_dict(run)
    train(cfg)
    tokenizer = load_tokenizer(tmp_path / "hf" / "tokenizer.json")
    assert tokenizer.eod_id == source["eod"]
    stop_ids, _ = stop_conditions(None, tokenizer)
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=stop_ids)
    model = load_eval_model(cfg, str(tmp_path / "dacpt"), torch.device("cpu"))
    answer = NativeSampler.for_tokenizer(model, tokenizer, torch.device("cpu")).generate([source["prompt"]], greedy)[0]
    assert len(answer.token_ids) == 3 and answer.token_ids[-1] == source["eod"]  # the engine stopped at step 3
    for name, src in (("from_import", tmp_path / "ckpt"), ("from_run", tmp_path / "dacpt")):
        summary = mdt_to_hf(src, tmp_path / name)
        assert sorted(summary["eos_token_id"]) == sorted([source["eod"], source["eot"]]), name
        config = json.loads((tmp_path / name / "config.json").read_text())
        generation = json.loads((tmp_path / name / "generation_config.json").read_text())
        for entry in (config, generation):
            assert entry["bos_token_id"] == source["bos"], name
            assert sorted(entry["eos_token_id"]) == sorted([source["eod"], source["eot"]]), name
        assert generation["temperature"] == 0.6 and generation["top_p"] == 0.9 and generation["do_sample"], name
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / name), dtype=torch.float32)
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([source["prompt"]]), max_new_tokens=8, do_sample=False)
        assert out[0, len(source["prompt"]):].tolist() == answer.token_ids, name


def test_default_ids_of_another_vocabulary_are_not_carried(tmp_path, corpora):
    """A source folder with transformers' default ids (bos 1, eos 2: ordinary tokens of this
    tokenizer) exports with the tokenizer's end of document as eos, and says what it ignored."""
    make_hf_model(tmp_path / "hf", "llama_mha", tokenizer=corpora["tokenizer"])
    hf_to_mdt(tmp_path / "hf", tmp_path / "ckpt")
    summary = mdt_to_hf(tmp_path / "ckpt", tmp_path / "export")
    eod = corpora["eod_id"]
    assert summary["eos_token_id"] == [eod]
    assert summary["ignored_source_token_ids"] == {"eos_token_id": [2], "bos_token_id": [1]}
    for name in ("config.json", "generation_config.json"):
        entry = json.loads((tmp_path / "export" / name).read_text())
        assert entry["eos_token_id"] == eod and entry.get("bos_token_id") is None and entry["pad_token_id"] == eod, name


def test_convert_never_destroys_data_at_or_around_the_destination(tmp_path, corpora):
    """A non-empty destination is refused (its files untouched) unless --overwrite; the source,
    a folder holding it, or a folder inside it is never a destination that deletes it."""
    src = make_hf_model(tmp_path / "hf", "llama_mha", tokenizer=corpora["tokenizer"])
    hf_to_mdt(src, tmp_path / "ckpt")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("notes")
    for convert in (lambda dst, **kw: mdt_to_hf(tmp_path / "ckpt", dst, **kw),
                    lambda dst, **kw: hf_to_mdt(src, dst, **kw)):
        with pytest.raises(FileExistsError, match=r"precious exists and is not empty.*--overwrite"):
            convert(precious)
        assert (precious / "notes.txt").read_text() == "notes"
    with pytest.raises(ValueError, match=r"is \(or contains\) the source"):
        mdt_to_hf(tmp_path / "ckpt", tmp_path / "ckpt", overwrite=True)
    with pytest.raises(ValueError, match=r"is \(or contains\) the source"):
        hf_to_mdt(src, tmp_path, overwrite=True)  # the folder that holds the source
    with pytest.raises(ValueError, match=r"inside the source .*--overwrite"):
        mdt_to_hf(tmp_path / "ckpt", tmp_path / "ckpt" / "export")
    assert (tmp_path / "ckpt" / "extra.json").is_file() and (src / "config.json").is_file()
    summary = mdt_to_hf(tmp_path / "ckpt", precious, overwrite=True)
    assert summary["max_logit_diff"] <= 1e-4 and not (precious / "notes.txt").exists()
    assert (precious / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf", "precious"]  # no staging folder left


def test_failed_verification_leaves_the_destination_as_it_was(tmp_path):
    """An fp16 export of weights beyond fp16's range cannot reproduce the logits: the
    verification fails, and neither a new nor an --overwrite destination changes."""
    from safetensors.torch import load_file, save_file

    src = make_hf_model(tmp_path / "hf", "llama_mha", shard="10MB")
    weights = load_file(str(src / "model.safetensors"))
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = 1e6  # fine in fp32, inf in fp16
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    hf_to_mdt(src, tmp_path / "ckpt")
    with pytest.raises(HFCheckpointError, match="verification failed: max logit difference"):
        mdt_to_hf(tmp_path / "ckpt", tmp_path / "export", dtype="fp16")
    assert not (tmp_path / "export").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.safetensors").write_text("previous export")
    with pytest.raises(HFCheckpointError, match="verification failed"):
        mdt_to_hf(tmp_path / "ckpt", tmp_path / "old", dtype="fp16", overwrite=True)
    assert (tmp_path / "old" / "model.safetensors").read_text() == "previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf", "old"]


def test_rope_parameters_win_over_a_top_level_rope_theta(tmp_path):
    """transformers 5 reads rope_parameters.rope_theta and ignores a stale top-level
    rope_theta; the import reads the same value, so the logits agree."""
    src = make_hf_model(tmp_path / "hf", "llama_mha")
    config = json.loads((src / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 10000.0
    (src / "config.json").write_text(json.dumps({**config, "rope_theta": 500000.0}))
    assert hf_to_mdt(src, tmp_path / "ckpt")["max_logit_diff"] <= 1e-4


def test_init_from_an_import_checks_or_takes_its_model_config(tmp_path, corpora):
    """A preset that differs from the imported checkpoint's model.yaml in semantics (here the
    llama3 RoPE scaling) is refused naming the field and file; without a preset the model
    config is read from the checkpoint, and the run starts from the imported weights."""
    from megatron_domain.config import ConfigError, config_from_dict
    from megatron_domain.engine import train

    from conftest import tiny_config_dict

    hf_to_mdt(make_hf_model(tmp_path / "hf", "llama_gqa_rope_scaling"), tmp_path / "ckpt")
    run = tiny_config_dict(corpora, tmp_path / "run", steps=1)
    run["model"] = {"preset": "tiny-test", "num_layers": 4, "init_from": str(tmp_path / "ckpt")}
    with pytest.raises(ConfigError, match=r"model.init_from: .*ckpt was trained with another model config: "
                                          r"model.rope_scaling: .*type='none'.* here but .*type='llama3'.* in "
                                          r".*ckpt/model.yaml"):
        config_from_dict(run)
    run["model"] = {"init_from": str(tmp_path / "ckpt")}
    cfg = config_from_dict(run)
    assert cfg.model.rope_scaling.type == "llama3" and cfg.model.num_layers == 4
    first = train(cfg).losses[0]
    run["model"]["init_from"] = f"hf:{tmp_path / 'hf'}"  # the same weights straight from the HF folder
    run["train"]["run_dir"] = str(tmp_path / "run_hf")
    assert train(config_from_dict(run)).losses[0] == pytest.approx(first, abs=1e-5)
    run["model"]["init_from"] = str(tmp_path / "nothing")
    with pytest.raises(ConfigError, match=r"nothing holds no model config.*set model.preset") as err:
        config_from_dict(run)
    assert len(err.value.problems) == 1  # not six "must be > 0" errors besides
