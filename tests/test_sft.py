"""The `sft` mode end to end on a tiny model: LoRA SFT on chat data trains, resumes exactly
from an adapter checkpoint; greedy generation batches exactly; the house-format rubric."""

from __future__ import annotations

import json

import pytest
import torch

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
    logits = train(sft_config(corpora, tmp_path, "logits", base, kernels={"fused_cross_entropy": False})).losses
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


def test_sft_stream_takes_every_row_once_per_epoch_across_ranks_and_steps(corpora, tmp_path):
    """Global batch 4 of micro-batches of 1 on two data-parallel ranks: the rows of consecutive
    steps, micro-batches and ranks are all different until the epoch is used up (every packed
    row exactly once), and a cursor restored from state_dict continues the same stream."""
    from pathlib import Path

    import numpy as np

    from megatron_domain.data.tokenizer import load_tokenizer
    from megatron_domain.stages import StageContext
    from megatron_domain.stages.sft import SftStage

    data = tiny_config_dict(corpora, tmp_path / "stream", micro_batch_size=1, global_batch_size=4)
    data.update(mode="sft")
    unique = tmp_path / "unique.jsonl"  # every conversation (so every packed row) differs
    unique.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"the module {i}?"},
                                                       {"role": "assistant", "content": f"it returns {i}."}]}) + "\n"
                              for i in range(60)))
    data["data"]["chat"] = {"path": str(unique), "template": "chatml"}
    cfg = config_from_dict(data)
    tokenizer = load_tokenizer(cfg.data.tokenizer)

    def stage(dp_rank: int) -> SftStage:
        s = SftStage()
        s.setup(StageContext(cfg=cfg, tokenizer=tokenizer, device=torch.device("cpu"), run_dir=Path(tmp_path),
                             dp_rank=dp_rank, dp_size=2))
        return s

    ranks = [stage(0), stage(1)]
    rows = ranks[0].packed.tokens
    num_rows = len(rows)
    assert num_rows >= 8
    seen = []
    for step in range(num_rows // 4):
        for s in ranks:
            micro = s.batches(step)
            assert len(micro) == 2 and all(m["tokens"].shape[0] == 1 for m in micro)
            for m in micro:  # which packed row is this? (rows are distinct: found by content)
                matches = [i for i in range(num_rows) if np.array_equal(rows[i], m["tokens"][0].numpy())]
                assert len(matches) == 1
                seen.append(matches[0])
    flat = seen
    assert len(set(flat)) == len(flat) == 4 * (num_rows // 4)  # no row twice within the epoch
    restored = stage(0)
    restored.load_state_dict(ranks[0].state_dict())
    assert torch.equal(restored.batches(0)[0]["tokens"], ranks[0].batches(0)[0]["tokens"])


def test_sft_replay_mixes_raw_text_rows_and_resumes_exactly(tiny_config, corpora, tmp_path):
    """data.chat.replay 0.5 of 4 rows: every micro-batch holds 2 conversation rows (loss on the
    assistant tokens only) then 2 consecutive rows of the corpus blend (loss on every token but
    positions whose input is an EOD), the conversation rows are the no-replay stream's, in order; a replay
    run resumes exactly; bad settings are errors naming the key."""
    from pathlib import Path

    from megatron_domain.config import ConfigError
    from megatron_domain.data.tokenizer import load_tokenizer
    from megatron_domain.stages import StageContext
    from megatron_domain.stages.sft import SftStage

    base = train(tiny_config("base", steps=2)).final_checkpoint

    def stage(cfg) -> SftStage:
        s = SftStage()
        s.setup(StageContext(cfg=cfg, tokenizer=load_tokenizer(cfg.data.tokenizer), device=torch.device("cpu"),
                             run_dir=Path(cfg.train.run_dir), dp_rank=0, dp_size=1))
        return s

    plain = sft_config(corpora, tmp_path, "plain", base, micro_batch_size=2, global_batch_size=4)
    mixed = sft_config(corpora, tmp_path, "mixed", base, micro_batch_size=4, global_batch_size=8)
    mixed.data.chat.replay = 0.5
    plain_stage, mixed_stage = stage(plain), stage(mixed)
    assert mixed_stage.replay_rows == 2 and mixed_stage.stats["replay_rows_per_micro_batch"] == 2
    chat_rows, text_rows = [], []
    for step in range(3):
        for m in mixed_stage.batches(step):
            assert m["tokens"].shape == (4, 64) and set(m) == {"tokens", "labels", "loss_mask", "position_ids",
                                                               "document_ids"}
            chat_rows.append(m["tokens"][:2])
            text_rows.append(m)
            assert m["loss_mask"][:2].float().mean() < 0.9  # prompts and padding are not trained
            eod = corpora["eod_id"]
            assert bool((m["loss_mask"][2:].bool() == (m["tokens"][2:] != eod)).all())
    want = torch.cat([m["tokens"] for step in range(3) for m in plain_stage.batches(step)])
    assert torch.equal(torch.cat(chat_rows), want)
    replayed = torch.cat([m["tokens"][2:] for m in text_rows])  # [12, S]: consecutive stream samples
    stream = mixed_stage.replay.micro_batch(0, 12)["tokens"]
    assert torch.equal(replayed, stream)
    straight = train(_replay_config(corpora, tmp_path, "r_straight", base)).losses
    first = train(_replay_config(corpora, tmp_path, "r_resumed", base, exit_at_step=4)).losses
    second = train(_replay_config(corpora, tmp_path, "r_resumed", base), resume=True).losses
    assert first + second == straight
    bad = tiny_config_dict(corpora, tmp_path / "bad")
    bad["data"]["chat"] = {"path": str(chat_file(tmp_path)), "replay": 0.25}
    with pytest.raises(ConfigError, match=r"data.chat.replay: only the sft and rs_sft modes replay raw text"):
        config_from_dict(bad)
    bad.update(mode="sft")
    bad["data"]["corpora"] = []
    with pytest.raises(ConfigError, match=r"data.chat.replay: 0.25 needs data.corpora"):
        config_from_dict(bad)
    few = sft_config(corpora, tmp_path, "few", base, micro_batch_size=2, global_batch_size=2)
    few.data.chat.replay = 0.1
    with pytest.raises(ValueError, match=r"data.chat.replay: 0.1 of train.micro_batch_size=2 rows is 0 replay rows"):
        stage(few)


def test_sft_replay_loss_weight_is_a_weighted_token_mean(tiny_config, corpora, tmp_path):
    """data.chat.replay_loss_weight w: the replay rows' loss mask holds w per trained token and
    the first step's loss is (sum of chat CE + w x sum of replay CE) / (chat tokens + w x replay
    tokens), computed here from the untrained model's logits; w <= 0 and w != 1 under pp are
    errors naming the key."""
    from pathlib import Path

    from megatron_domain.config import ConfigError
    from megatron_domain.data.tokenizer import load_tokenizer
    from megatron_domain.eval.harness import load_eval_model
    from megatron_domain.stages import StageContext
    from megatron_domain.stages.sft import SftStage

    base = train(tiny_config("base", steps=2)).final_checkpoint
    cfg = _replay_config(corpora, tmp_path, "weighted", base)
    cfg.train.steps = 1
    cfg.data.chat.replay_loss_weight = 0.25
    stage = SftStage()
    stage.setup(StageContext(cfg=cfg, tokenizer=load_tokenizer(cfg.data.tokenizer), device=torch.device("cpu"),
                             run_dir=Path(cfg.train.run_dir), dp_rank=0, dp_size=1))
    batch = stage.batches(0)[0]
    mask = batch["loss_mask"]  # [4, S]: 3 conversation rows, 1 replay row
    assert mask.dtype == torch.float32 and set(mask[:3].unique().tolist()) == {0.0, 1.0}
    assert set(mask[3].unique().tolist()) <= {0.0, 0.25} and mask[3].max() == 0.25
    model = load_eval_model(cfg, None, torch.device("cpu"))
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], batch["document_ids"])  # [4, S, V]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten().clamp(min=0),
                                            reduction="none").view(4, -1)  # [4, S]
    chat, text = mask[:3] > 0, mask[3] > 0
    want = (nll[:3][chat].sum() + 0.25 * nll[3][text].sum()) / (chat.sum() + 0.25 * text.sum())
    assert train(cfg).losses[0] == pytest.approx(want.item(), abs=1e-5)
    bad = tiny_config_dict(corpora, tmp_path / "bad")
    bad.update(mode="sft", parallel={"pp": 2})
    bad["data"]["chat"] = {"path": str(chat_file(tmp_path)), "replay": 0.25, "replay_loss_weight": 0.5}
    with pytest.raises(ConfigError, match=r"data.chat.replay_loss_weight: 0.5 is not available with parallel.pp > 1"):
        config_from_dict(bad)
    bad["data"]["chat"]["replay_loss_weight"] = 0.0
    with pytest.raises(ConfigError, match=r"data.chat.replay_loss_weight: must be > 0, got 0.0"):
        config_from_dict(bad)


def _replay_config(corpora, tmp_path, name, base, **train_kw):
    cfg = sft_config(corpora, tmp_path, name, base, micro_batch_size=4, global_batch_size=4, **train_kw)
    cfg.data.chat.replay = 0.25
    return cfg
