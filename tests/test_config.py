"""Config: every problem at once with dotted paths, nearest-key suggestions, overrides, presets."""

from __future__ import annotations

import pytest

from megatron_domain.config import ConfigError, apply_overrides, config_from_dict, load_config, load_pipeline


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {"preset": "tiny-test", "hiden_size": 64}, "data": {"seq_len": 64}})
    assert "model.hiden_size: unknown key; did you mean 'model.hidden_size'?" in str(err.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {"preset": "tiny-test", "num_kv_heads": 3},
                          "data": {"seq_len": 1024}, "optim": {"lr": -1, "warmupsteps": 3, "implementation": "apex"},
                          "train": {"micro_batch_size": 3, "global_batch_size": 8, "dtype": "fp16"}})
    text = str(err.value)
    for expected in ["model.num_kv_heads: model.num_heads (4) must be a multiple of model.num_kv_heads (3)",
                     "data.seq_len: 1024 exceeds model.max_seq_len (256)",
                     "optim.lr: must be > 0, got -1.0",
                     "optim.min_lr: must be in [0, optim.lr=-1.0]",
                     "optim.warmupsteps: unknown key; did you mean 'optim.warmup_steps'?",
                     "train.global_batch_size: 8 is not a multiple of train.micro_batch_size (3)",
                     "train.dtype: unknown 'fp16'",
                     "optim.implementation: unknown 'apex'; choose auto, fused or foreach"]:
        assert expected in text
    assert len(err.value.problems) == 8


def test_type_errors_name_the_path():
    with pytest.raises(ConfigError, match=r"train.steps: expected an integer, got 'ten'"):
        config_from_dict({"model": {"preset": "tiny-test"}, "data": {"seq_len": 64}, "train": {"steps": "ten"}})


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match=r"model.preset: unknown preset 'llama3.1-9b'; did you mean 'llama3.1-8b'"):
        config_from_dict({"model": {"preset": "llama3.1-9b"}})


def test_preset_values_can_be_overridden():
    cfg = config_from_dict({"model": {"preset": "qwen2.5-7b", "num_layers": 2}, "data": {"seq_len": 128}})
    assert cfg.model.qkv_bias and cfg.model.num_layers == 2 and cfg.model.hidden_size == 3584


def test_set_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: tiny-test}\ndata: {seq_len: 64}\n")
    cfg = load_config(path, ["train.steps=7", "optim.lr=1e-3", "model.tie_embeddings=true", "train.run_dir=x/y"])
    assert (cfg.train.steps, cfg.optim.lr, cfg.model.tie_embeddings, cfg.train.run_dir) == (7, 1e-3, True, "x/y")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["train.steps"])


def test_list_items_addressed_by_name_or_index():
    data = {"stages": [{"name": "a", "train": {"steps": 1}}, {"name": "b"}]}
    out = apply_overrides(data, ["stages.b.train.steps=5", "stages.0.train.steps=2"])
    assert out["stages"][1]["train"]["steps"] == 5 and out["stages"][0]["train"]["steps"] == 2
    with pytest.raises(ConfigError, match=r"no list item 'c'; .* or one of the names \['a', 'b'\]"):
        apply_overrides(data, ["stages.c.train.steps=5"])


def test_pipeline_errors_name_the_stage(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("defaults: {model: {preset: tiny-test}, data: {seq_len: 64}}\n"
                    "stages:\n  - {name: one, optim: {lr: 0}}\n  - {name: two, train: {stepz: 3}}\n"
                    "checks:\n  - {stage: three, set: x}\n")
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    text = str(err.value)
    assert "stages[one].optim.lr: must be > 0" in text
    assert "stages[two].train.stepz: unknown key; did you mean 'stages[two].train.steps'?" in text
    assert "checks: replaced by per-stage gates" in text


def test_demo_pipeline_config_is_valid():
    pipe, stages = load_pipeline("configs/pipelines/demo.yaml")
    assert [s.mode for s in stages] == ["pretrain", "pretrain", "sft", "dpo", "rs_sft"]
    assert stages[3].model.init_from.endswith("sft") and stages[3].dpo.online
    assert stages[3].train.steps == stages[3].dpo.rounds * stages[3].dpo.steps_per_round
    assert stages[1].model.init_from.endswith("base_pretrain")
    assert stages[2].model.init_from.endswith("dacpt") and stages[2].lora.rank == 64
    weights = {c.name: c.weight for c in stages[1].data.corpora}
    assert weights == {"domain": 0.9, "general": 0.1}
    rs = stages[4]
    assert rs.model.init_from.endswith("dpo") and rs.train.steps == 0 and rs.rs_sft.keep_fraction == 0.5
    assert rs.rs_sft.train_on == "passing" and rs.rs_sft.gold_field == "gold"  # the seeds' key (demo_sft.py)
    assert [(r.name, r.constraint, r.when) for r in rs.rs_sft.judge.rules] == [
        ("format", False, "source"), ("citation", True, "source"), ("faithful", False, "answer"),
        ("refusal", False, "!source")]
    # the eval scores what the training judge does, less the reference-sentence rule
    assert rs.eval.dialogues.judge.rules == [r for r in rs.rs_sft.judge.rules if r.name != "faithful"]
    assert all(s.eval.seq_len == 256 for s in stages)  # perplexity comparable across the stages
    assert rs.eval.dialogues.late_turn == 6


@pytest.mark.parametrize("key, suggestion", [
    ("optim.learning_rate", "optim.lr"), ("data.chat_template", "data.chat.template"),
    ("train.max_steps", "train.steps"), ("lora.lora_alpha", "lora.alpha"), ("train.output_dir", "train.run_dir"),
])
def test_keys_of_other_trainers_suggest_ours(key, suggestion):
    data = apply_overrides({"model": {"preset": "tiny-test"}, "data": {"seq_len": 64}}, [f"{key}=1"])
    with pytest.raises(ConfigError, match=rf"{key}: unknown key; did you mean '{suggestion}'\?"):
        config_from_dict(data)


def test_chat_block_in_a_mode_without_conversations_is_refused():
    """A data.chat value other than a default in a mode without conversations is an error; a
    run's saved config.json (every field at its default, or an older release's fields only) is not."""
    with pytest.raises(ConfigError, match=r"data.chat: set, but mode 'pretrain' reads no conversations"):
        config_from_dict({"mode": "pretrain", "model": {"preset": "tiny-test"},
                          "data": {"seq_len": 64, "chat": {"path": "chat.jsonl", "template": "chatml"}}})
    for saved in ({"path": "", "template": "chatml", "overflow": "truncate", "replay": 0.0, "replay_loss_weight": 1.0},
                  {"path": "", "template": "chatml", "overflow": "truncate", "replay": 0.0}):
        config_from_dict({"mode": "pretrain", "model": {"preset": "tiny-test"}, "data": {"seq_len": 64, "chat": saved}})


def test_cli_messages_name_the_option_and_the_file(tmp_path, corpora):
    """`mdt data preprocess --tokenizer` names --tokenizer (not data.tokenizer); a layout problem
    found only at run time (QLoRA under tp=2) names the config file."""
    import subprocess
    import sys

    (tmp_path / "in.txt").write_text("some text\n")
    run = subprocess.run([sys.executable, "-m", "megatron_domain.cli", "data", "preprocess", "--input",
                          str(tmp_path / "in.txt"), "--tokenizer", str(tmp_path / "nope"), "--output-prefix",
                          str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 2 and "--tokenizer must be a tokenizer.json" in run.stderr, run.stderr
    config = tmp_path / "qlora.yaml"
    config.write_text(f"mode: pretrain\nmodel: {{preset: tiny-test}}\ndata: {{tokenizer: {corpora['tokenizer']}, "
                      "seq_len: 64}\nlora: {rank: 4, quantize_base: nf4}\nparallel: {tp: 2}\n")
    run = subprocess.run([sys.executable, "-m", "megatron_domain.cli", "train", str(config), "--dry-run",
                          "--world-size", "2"], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert f"invalid configuration in {config}" in run.stderr and "lora.quantize_base: nf4 (QLoRA)" in run.stderr
