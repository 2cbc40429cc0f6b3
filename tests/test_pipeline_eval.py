"""A pipeline stage's eval of its start reuses the previous stage's eval of its final weights
(generation, dialogues, lm-eval suites) only when the two are the same model under the same
settings; perplexity is always measured and must agree. Checked on the chat test model: a
LoRA stage's end (adapters merged by the next stage's init_from) reused vs evaluated afresh."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import synthetic_documents, ALPHA_WORDS
from megatron_domain.checkpoint import latest_checkpoint
from megatron_domain.config import config_from_dict
from megatron_domain.data.indexed import write_indexed_dataset
from megatron_domain.data.preprocess import tokenize_documents
from megatron_domain.data.tokenizer import load_tokenizer
from megatron_domain.eval.harness import evaluate_model, load_eval_model
from megatron_domain.pipeline import PreviousStage, evaluate_stage_input, reusable_sections

CPU = torch.device("cpu")


@pytest.fixture
def stages(chat_run, tmp_path):
    """The chat LoRA run as the previous stage (with a generation eval and a held-out set) and
    its evaluated end; the next stage's config starts from that run."""
    tok = load_tokenizer(chat_run["tokenizer"])
    write_indexed_dataset(tmp_path / "heldout", tokenize_documents(iter(synthetic_documents(ALPHA_WORDS, 12, seed=9)),
                                                                   tok, progress=False), tok.vocab_size)
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"prompt": f"what is {w}?", "source": w}) + "\n"
                                 for w in ("list", "module", "error")))
    data = copy.deepcopy(chat_run["lora_config"])
    data["eval"] = {"sets": [{"name": "alpha", "path": str(tmp_path / "heldout")}], "batch_size": 4,
                    "generation": {"path": str(questions), "max_new_tokens": 12}}
    previous_cfg = config_from_dict(data)
    checkpoint = str(latest_checkpoint(chat_run["lora"]))
    after = evaluate_model(previous_cfg, load_eval_model(previous_cfg, checkpoint, CPU), CPU)
    after["checkpoint"] = checkpoint
    nxt = copy.deepcopy(data)
    nxt["model"] = {**nxt["model"], "init_from": chat_run["lora"]}
    nxt["train"] = {**nxt["train"], "run_dir": str(tmp_path / "next")}
    nxt["eval"]["generation"]["kl_samples"] = 1
    return PreviousStage("lora", previous_cfg, chat_run["lora"], after), nxt


def test_reused_generation_equals_a_fresh_eval_of_the_start(stages):
    previous, nxt = stages
    cfg = config_from_dict(nxt)
    assert reusable_sections(cfg, previous) == {"generation"}
    reused = evaluate_stage_input(cfg, CPU, previous, "next")
    fresh = evaluate_stage_input(cfg, CPU)
    assert reused["reused"] == {"from": "lora", "sections": ["generation"]} and "reused" not in fresh
    assert reused["ppl"] == pytest.approx(fresh["ppl"])
    assert reused["ppl"]["alpha"] == pytest.approx(previous.eval_after["ppl"]["alpha"], rel=1e-4)  # merged == adapters
    measured_kl = fresh["generation"].pop("kl_to_reference")
    assert measured_kl == pytest.approx(0.0, abs=1e-5) and reused["generation"].pop("kl_to_reference") == 0.0
    assert reused["generation"] == fresh["generation"]  # the same greedy answers, scored the same


def test_no_reuse_when_settings_weights_or_perplexity_differ(stages, capsys):
    previous, nxt = stages
    longer = copy.deepcopy(nxt)
    longer["eval"]["generation"]["max_new_tokens"] = 16
    assert reusable_sections(config_from_dict(longer), previous) == set()
    elsewhere = copy.deepcopy(nxt)
    elsewhere["model"]["init_from"] = str(previous.cfg.model.init_from)  # the LoRA run's base, not its end
    assert reusable_sections(config_from_dict(elsewhere), previous) == set()
    assert reusable_sections(config_from_dict(nxt), None) == set()
    doctored = PreviousStage(previous.name, previous.cfg, previous.run_dir,
                             {**previous.eval_after, "ppl": {"alpha": previous.eval_after["ppl"]["alpha"] * 1.1}})
    result = evaluate_stage_input(config_from_dict(nxt), CPU, doctored, "next")
    assert "reused" not in result and result["generation"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)
    assert "[next] not reusing lora's eval of its final weights: perplexity differs (alpha" in capsys.readouterr().out
