"""The `sft` mode end to end on a tiny model: LoRA SFT on chat data trains, resumes exactly
from an adapter checkpoint; greedy generation batches exactly; the house-format rubric."""

from __future__ import annotations


import pytest

from megatron_domain.config import config_from_dict
from megatron_domain.engine import train
from megatron_domain.eval.rubric import score_answer

from conftest import chat_lines, tiny_config_dict


def chat_file(tmp_path, count: int = 40):
    """Conversations whose answers follow a fixed pattern the model can learn."""
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(chat_lines(count)) + "\n")
    return path


def sft_config(corpora, tmp_path, name, base, kernels: dict | None = None, **train_kw):
    data = tiny_config_dict(corpora, tmp_path / name, steps=8, **train_kw)
    data.update(mode="sft", model={"preset": "tiny-test", "init_from": str(base)},
                lora={"rank": 8, "dropout": 0.0}, optim={"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1},
                kernels=kernels or {})
    data["data"]["chat"] = {"path": str(chat_file(tmp_path)), "template": "chatml"}
    return config_from_dict(data)


def test_lora_sft_trains_and_resumes_exactly(tiny_config, corpora, tmp_path):
    base = train(tiny_config("base", steps=2)).final_checkpoint
    straight = train(sft_config(corpora, tmp_path, "straight", base)).losses
    assert sum(straight[-3:]) / 3 < sum(straight[:3]) / 3 - 0.3
    first = train(sft_config(corpora, tmp_path, "resumed", base, exit_at_step=4)).losses
    second = train(sft_config(corpora, tmp_path, "resumed", base), resume=True).losses
    assert first + second == straight


def test_lora_sft_with_fused_cross_entropy_equals_logits_path(tiny_config, corpora, tmp_path):
    """The fused loss in the sft mode (assistant-only mask, frozen output head: no head
    gradient is computed) gives the losses of the full-logits path."""
    base = train(tiny_config("base", steps=2)).final_checkpoint
    logits = train(sft_config(corpora, tmp_path, "logits", base)).losses
    fused = train(sft_config(corpora, tmp_path, "fused", base,
                             kernels={"fused_cross_entropy": True, "logprob_chunk_rows": 40})).losses
    assert fused == pytest.approx(logits, abs=1e-5)


def test_house_format_rubric():
    assert score_answer("Assert statements insert debugging assertions. [source: `assert`]", "assert") == {
        "format_ok": True, "citation_ok": True, "refused": False}
    assert score_answer("Assert statements insert assertions. [source: `raise`]", "assert")["citation_ok"] is False
    assert score_answer("two lines.\nsecond [source: `assert`]", "assert")["format_ok"] is False
    # a citation without the backticks names the right topic but is not the house format
    assert score_answer("Assert statements insert assertions. [source: assert]", "assert") == {
        "format_ok": False, "citation_ok": True, "refused": False}
    assert score_answer("no citation at all.", "assert") == {"format_ok": False, "citation_ok": False,
                                                             "refused": False}
    refusal = "I cannot answer that from the reference."
    assert score_answer(f" {refusal}", None, refusal) == {"format_ok": False, "citation_ok": False, "refused": True}
    assert score_answer(f"{refusal} [source: `x`]", "x", refusal)["refused"] is False
