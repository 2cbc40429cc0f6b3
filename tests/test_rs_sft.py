"""The `rs_sft` mode: seeds, batched multi-turn generation, dialogue-level rubric scores with
constraint retention, selection per seed, the collapse guard, resume of a killed generation,
the loss mask over every assistant turn, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_domain.config import ConfigError, RubricRuleConfig, config_from_dict
from megatron_domain.data.chat import ChatDataError, load_template
from megatron_domain.data.seeds import parse_seed, read_seeds
from megatron_domain.data.tokenizer import load_tokenizer
from megatron_domain.engine import train
from megatron_domain.eval.harness import load_eval_model
from megatron_domain.judges import JudgeError
from megatron_domain.judges.dialogue import rubric_dialogue_score, score_dialogues
from megatron_domain.judges.rubric import RubricJudge
from megatron_domain.rollout.dialogues import Dialogue, generate_dialogues
from megatron_domain.rollout.native import NativeSampler
from megatron_domain.rollout.prompts import stop_conditions
from megatron_domain.rollout.sampling import SamplingParams
from megatron_domain.config import CollapseGuardConfig
from megatron_domain.stages.selection import collapse_problems, diversity, select

from conftest import ALPHA_WORDS, chat_run_config

FORMAT = {"name": "format", "pattern": "\\[source: `[^`]+`\\]$"}
CITATION = {"name": "citation", "pattern": "\\[source: `{source}`\\]", "when": "source", "constraint": True}


def write_seeds(path: Path, count: int = 3) -> Path:
    """Seeds asking about one word each, the citation constraint stated in turn 1; the
    follow-ups ask about other words, each with its own source."""
    lines = []
    for i in range(count):
        word, later = ALPHA_WORDS[i], ALPHA_WORDS[i + 5]
        lines.append({"id": f"s{i}", "user": f"what is {word}?", "source": word,
                      "constraints": ["cite the source of every answer"],
                      "follow_ups": [{"content": f"what is {later}?", "source": later}]})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def rs_config(chat_run: dict, root: Path, name: str, **rs) -> dict:
    """An rs_sft run on top of the chat test model (full fine-tuning)."""
    cfg = chat_run_config(root, name, chat_run["tokenizer"], "", steps=0, model={"init_from": chat_run["sft"]})
    cfg["mode"] = "rs_sft"
    cfg["data"]["seq_len"] = 128
    cfg["data"]["chat"] = {"template": "chatml"}
    cfg["train"]["global_batch_size"] = cfg["train"]["micro_batch_size"] = 2
    cfg["rollout"] = {"temperature": 1.0, "max_new_tokens": 16, "seed": 5}
    cfg["rs_sft"] = {"seeds": str(write_seeds(root / "seeds.jsonl")), "dialogues_per_seed": 4, "turns": 3,
                     "follow_ups": [f"what is {w}?" for w in ALPHA_WORDS[8:12]], "keep_fraction": 0.5,
                     "seeds_per_chunk": 1, "judge": {"kind": "rubric", "rules": [FORMAT, CITATION]}, **rs}
    return cfg


@pytest.fixture(scope="module")
def chat_model(chat_run):
    """The chat test model, its tokenizer and template."""
    cfg = config_from_dict(chat_run["sft_config"])
    tokenizer = load_tokenizer(chat_run["tokenizer"])
    model = load_eval_model(cfg, chat_run["sft"], torch.device("cpu"))
    return model, tokenizer, load_template("chatml")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batched_dialogues_equal_one_at_a_time(chat_model, tmp_path, temperature):
    """All seeds x dialogues in one batch per turn give the dialogues that generating every
    answer alone gives (greedy and sampled: each answer has its own seed)."""
    model, tokenizer, template = chat_model
    seeds = read_seeds(write_seeds(tmp_path / "seeds.jsonl"), default_turns=3)
    stop_ids, _ = stop_conditions(template, tokenizer)
    params = SamplingParams(max_new_tokens=16, temperature=temperature, stop_token_ids=stop_ids)
    sampler = NativeSampler.for_tokenizer(model, tokenizer, torch.device("cpu"))
    batches = []

    def batched(prompts, p, s, progress):
        batches.append(len(prompts))
        return sampler.generate(prompts, p, s)

    def one_at_a_time(prompts, p, s, progress):
        return [sampler.generate([prompt], p, [seed])[0] for prompt, seed in zip(prompts, s)]

    scripted = ["what is module?", "what is error?"]
    together = generate_dialogues(batched, seeds, 4, scripted, template, tokenizer, params, 100, base_seed=1)
    alone = generate_dialogues(one_at_a_time, seeds, 4, scripted, template, tokenizer, params, 100, base_seed=1)
    assert batches == [12, 12, 12]  # every turn of every dialogue in one call
    assert [[d.messages for d in g] for g in together] == [[d.messages for d in g] for g in alone]
    first = together[0][0]
    assert len(first.answers) == 3 and first.finish == "turns"
    assert [m["role"] for m in first.messages] == ["user", "assistant"] * 3
    assert first.messages[2]["content"] == f"what is {ALPHA_WORDS[5]}?"  # the seed's own follow-up
    assert first.messages[4]["content"] in scripted  # then the scripted list
    assert first.turn_fields[0]["source"] == ALPHA_WORDS[0] and first.turn_fields[1]["source"] == ALPHA_WORDS[5]
    if temperature > 0:  # sampled dialogues of one seed differ
        assert len({json.dumps(d.messages) for d in together[0]}) > 1


def test_rubric_scores_every_turn_and_retention_by_hand():
    """Per-turn rubric scores with the fields in force at each turn; the citation rule is the
    constraint, so its pass rate per turn is the retention; the score is the mean x 100."""
    judge = RubricJudge([RubricRuleConfig(**FORMAT), RubricRuleConfig(**CITATION)])
    dialogue = Dialogue("s0", 0, [
        {"role": "user", "content": "what is list?"},
        {"role": "assistant", "content": "a list. [source: `list`]"},        # format 1, citation 1
        {"role": "user", "content": "what is module?"},
        {"role": "assistant", "content": "a module. [source: `list`]"},      # format 1, citation 0 (new source)
        {"role": "user", "content": "and error?"},
        {"role": "assistant", "content": "an error."}],                      # format 0, citation 0
        opening=1, turn_fields=[{"source": "list"}, {"source": "module"}, {"source": "module"}],
        answer_token_ids=[[1], [1], [1]], finish="turns")
    score = rubric_dialogue_score(judge, dialogue)
    assert score.turn_scores == [1.0, 0.5, 0.0]
    assert score.retention == [1.0, 0.0, 0.0]
    assert score.score == pytest.approx(50.0)
    assert "t2: missed citation" in score.rationale


def test_selection_keeps_the_configured_share_per_seed():
    """8 dialogues x 0.25 = the best 2 of every seed; global keeps the best quarter overall;
    min_score and near-duplicates drop more, and ties keep the earlier dialogue."""
    scores = [[10, 90, 50, 70, 70, 20, 30, 40], [5, 6, 7, 8, 9, 10, 11, 12], [60] * 8]
    answers = [[[f"seed {s} answer {d} " + " ".join(ALPHA_WORDS[(d + k) % 15] for k in range(5))] for d in range(8)]
               for s in range(3)]
    per_seed = select(scores, answers, 0.25, "seed", 0.0, 1.0)
    # best first; seed 0's 70 vs 70 keeps dialogue 3 (the earlier); seed 2's ties keep 0 and 1
    assert per_seed.kept == [(0, 1), (0, 3), (2, 0), (2, 1), (1, 7), (1, 6)]
    assert per_seed.not_top == 18 and per_seed.below_min_score == 0
    overall = select(scores, answers, 0.25, "global", 0.0, 1.0)
    assert overall.kept == [(0, 1), (0, 3), (0, 4), (2, 0), (2, 1), (2, 2)] and overall.not_top == 18
    floor = select(scores, answers, 0.25, "seed", 50.0, 1.0)
    assert sorted(floor.kept) == [(0, 1), (0, 3), (2, 0), (2, 1)] and floor.below_min_score == 2
    duplicates = [[["the same answer again"]] * 8] * 3
    dedup = select(scores, duplicates, 0.25, "seed", 0.0, 0.9)
    assert len(dedup.kept) == 3 and dedup.deduplicated == 3  # one per seed survives


def test_collapse_guard_fires_on_a_collapsed_set_only():
    guard = CollapseGuardConfig(min_distinct_2=0.3, max_top_opening_share=0.5, max_self_similarity=0.8)
    collapsed = [[["Sure! The answer is yes."], ["Sure! The answer is yes."]]] * 4
    diverse = [[[f"{ALPHA_WORDS[(3 * s + d) % 15]} {ALPHA_WORDS[(5 * s + 2 * d + 1) % 15]} is {s}-{d}. "
                 f"Then {ALPHA_WORDS[(7 * s + d + 4) % 15]} follows {d}."] for d in range(2)] for s in range(4)]
    problems = collapse_problems(diversity(collapsed), guard)
    assert len(problems) == 3 and "open with 'sure!'" in problems[1]
    assert collapse_problems(diversity(diverse), guard) == []
    assert diversity(collapsed)["distinct_2"] < diversity(diverse)["distinct_2"]


def test_rs_sft_run_resumes_a_killed_generation_and_trains_every_assistant_turn(chat_run, tmp_path):
    """A run generates, judges (dialogues.jsonl), keeps half per seed and trains an epoch on
    them; a run killed after its first seed (plus half a line) regenerates only the rest and
    ends with the same file; the trained tokens are exactly the kept dialogues' assistant
    turns with their end-of-turn markers."""
    full = train(config_from_dict(rs_config(chat_run, tmp_path, "full")))
    lines = (tmp_path / "full" / "dialogues.jsonl").read_text().splitlines()
    assert len(lines) == 12 and all(json.loads(line)["dialogue"] in range(4) for line in lines)
    summary = json.loads((tmp_path / "full" / "rs_sft.json").read_text())
    assert summary["generated"] == 12 and summary["kept"] + summary["deduplicated"] == 6
    assert (tmp_path / "full" / "rs_sft_scores.png").is_file()
    assert len(full.losses) >= 1
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "dialogues.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][: len(lines[4]) // 2])
    train(config_from_dict(rs_config(chat_run, tmp_path, "killed")))
    resumed = (killed / "dialogues.jsonl").read_text().splitlines()
    assert sorted(resumed) == sorted(lines)  # same dialogues, scores and reasons

    from megatron_domain.stages import StageContext
    from megatron_domain.stages.rs_sft import RsSftStage

    cfg = config_from_dict(rs_config(chat_run, tmp_path, "full"))
    tokenizer = load_tokenizer(chat_run["tokenizer"])
    stage = RsSftStage()
    stage.setup(StageContext(cfg=cfg, tokenizer=tokenizer, device=torch.device("cpu"), run_dir=tmp_path / "full"))
    kept = [json.loads(line) for line in (tmp_path / "full" / "kept.jsonl").read_text().splitlines()]
    trained = []  # per packed dialogue: the decoded tokens its loss covers
    packed = stage.packed
    for row in range(packed.tokens.shape[0]):
        for doc in sorted(set(packed.document_ids[row].tolist())):
            in_doc = (packed.document_ids[row] == doc) & packed.loss_mask[row]
            if in_doc.any():
                trained.append(tokenizer.tokenizer.decode(packed.labels[row][in_doc].tolist(),
                                                          skip_special_tokens=False))
    expected = ["".join(m["content"] + "<|im_end|>" for m in k["messages"] if m["role"] == "assistant") for k in kept]
    assert sorted(trained) == sorted(expected)


def test_bad_seeds_and_settings_name_the_line_or_key(chat_run, tmp_path):
    with pytest.raises(ChatDataError, match=r"seeds.jsonl:2: a seed needs its opening user message"):
        bad = tmp_path / "seeds.jsonl"
        bad.write_text(json.dumps({"user": "hi"}) + "\n" + json.dumps({"system": "only a system prompt"}) + "\n")
        read_seeds(bad, 3)
    with pytest.raises(ChatDataError, match=r"x:7: \"turns\" must be an integer >= 1"):
        parse_seed({"user": "hi", "turns": 0}, "x:7", 3, 0)
    with pytest.raises(ChatDataError, match=r"x:1: the opening messages must end with a user turn"):
        parse_seed({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "x:1", 3, 0)
    with pytest.raises(ConfigError, match=r"rs_sft.dialogues_per_seed/rs_sft.turns/rs_sft.seeds_per_chunk: must be "
                                          r">= 1, got 0, 3, 1"):
        config_from_dict(rs_config(chat_run, tmp_path, "bad", dialogues_per_seed=0))
    judge = RubricJudge([RubricRuleConfig(name="broken", function="math:sqrt")])  # raises TypeError
    seeds = read_seeds(write_seeds(tmp_path / "ok.jsonl"), 3)
    dialogue = Dialogue("s0", 0, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "an answer"}],
                        opening=1, turn_fields=[{}], answer_token_ids=[[1]], finish="turns")
    with pytest.raises(JudgeError, match=r"judge failed on turn 1 of dialogue 0 of seed 's0' \(.*ok.jsonl:1\): "
                                         r"TypeError"):
        score_dialogues(judge, seeds[:1], [[dialogue]])
    none_judge = RubricJudge([RubricRuleConfig(name="abstains", function="builtins:print")])  # returns None
    with pytest.raises(JudgeError, match=r"rule 'abstains' gave no score for turn 1 of dialogue 0 of seed 's0' "
                                         r"\(.*ok.jsonl:1\)"):
        score_dialogues(none_judge, seeds[:1], [[dialogue]])
