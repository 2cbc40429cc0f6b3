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
from megatron_domain.rollout.prompts import chat_prompt_ids, stop_conditions
from megatron_domain.rollout.sampling import SamplingParams
from megatron_domain.config import CollapseGuardConfig
from megatron_domain.stages.selection import collapse_problems, diversity, select

from conftest import ALPHA_WORDS, chat_run_config, train_tp_splittable_chat_model

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


# prompt tokens a dialogue may reach: room for three turns of the fixture model's answers. At 100 a
# sampled dialogue ran out of it on an AMD EPYC (the fixture trains a slightly different model on
# each CPU) and finished with "context" after two turns; the limit itself is tested below
ROOM = 200


def test_a_dialogue_past_the_prompt_limit_finishes_with_context(chat_model):
    """A turn whose prompt would exceed max_prompt_tokens is not asked: its user message goes,
    the dialogue keeps its earlier answers and finishes with "context"."""
    model, tokenizer, template = chat_model
    seeds = [parse_seed({"id": "s", "user": "what is alpha?", "follow_ups": ["what is beta?", "what is gamma?"]},
                        "seeds.jsonl:1", 3, 0)]
    stop_ids, _ = stop_conditions(template, tokenizer)
    params = SamplingParams(max_new_tokens=16, temperature=0.0, stop_token_ids=stop_ids)
    sampler = NativeSampler.for_tokenizer(model, tokenizer, torch.device("cpu"))
    generate = lambda prompts, p, s, progress: sampler.generate(prompts, p, s)  # noqa: E731
    first_prompt = len(chat_prompt_ids(seeds[0].opening, template, tokenizer))
    dialogue = generate_dialogues(generate, seeds, 1, [], template, tokenizer, params, first_prompt, 0)[0][0]
    assert dialogue.finish == "context" and len(dialogue.answers) == 1
    assert [m["role"] for m in dialogue.messages] == ["user", "assistant"]


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
    together = generate_dialogues(batched, seeds, 4, scripted, template, tokenizer, params, ROOM, base_seed=1)
    alone = generate_dialogues(one_at_a_time, seeds, 4, scripted, template, tokenizer, params, ROOM, base_seed=1)
    assert [d.finish for g in together for d in g] == ["turns"] * 12
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


def trained_texts(packed, tokenizer) -> list[str]:
    """Per packed conversation: the decoded tokens its loss covers."""
    texts = []
    for row in range(packed.tokens.shape[0]):
        for doc in sorted(set(packed.document_ids[row].tolist())):
            in_doc = (packed.document_ids[row] == doc) & (packed.loss_mask[row] > 0)
            if in_doc.any():
                texts.append(tokenizer.tokenizer.decode(packed.labels[row][in_doc].tolist(), skip_special_tokens=False))
    return texts


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
    trained = trained_texts(stage.packed, tokenizer)
    expected = ["".join(m["content"] + "<|im_end|>" for m in k["messages"] if m["role"] == "assistant") for k in kept]
    assert sorted(trained) == sorted(expected)

    # the collapse guard on the same kept set: an impossible distinct-2 floor warns, or fails
    from megatron_domain.stages.rs_sft import CollapsedKeptSet

    for fail in (False, True):
        guarded = config_from_dict(rs_config(chat_run, tmp_path, "full", collapse={"min_distinct_2": 0.999,
                                                                                   "fail": fail}))
        context = StageContext(cfg=guarded, tokenizer=tokenizer, device=torch.device("cpu"), run_dir=tmp_path / "full")
        if fail:
            with pytest.raises(CollapsedKeptSet, match=r"distinct-2 of the kept answers is .* < "
                                                       r"rs_sft.collapse.min_distinct_2 \(0.999\).*nothing was trained"):
                RsSftStage().setup(context)
        else:
            with pytest.warns(UserWarning, match="the kept dialogues look collapsed"):
                RsSftStage().setup(context)


def test_replayed_conversations_train_beside_the_kept_dialogues(chat_run, tmp_path):
    """rs_sft.replay with replay_fraction 1.5: 1.5 conversations of the replay file per kept
    dialogue (a seeded draw, the whole file again when it runs out) train beside the kept
    dialogues, every assistant turn of them; the summary counts them; a fraction without a
    file is refused."""
    from megatron_domain.stages import StageContext
    from megatron_domain.stages.rs_sft import RsSftStage, replay_conversations

    pool = [[{"role": "user", "content": f"what is {w}?"}, {"role": "assistant", "content": f"the {w} returns a list."},
             {"role": "user", "content": "and then?"}, {"role": "assistant", "content": f"then {w}."}]
            for w in ALPHA_WORDS[:3]]
    replay = tmp_path / "replay.jsonl"
    replay.write_text("".join(json.dumps({"messages": m}) + "\n" for m in pool))
    cfg = config_from_dict(rs_config(chat_run, tmp_path, "replay", replay=str(replay), replay_fraction=1.5))
    assert len(train(cfg).losses) >= 1
    tokenizer = load_tokenizer(chat_run["tokenizer"])
    stage = RsSftStage()
    stage.setup(StageContext(cfg=cfg, tokenizer=tokenizer, device=torch.device("cpu"), run_dir=tmp_path / "replay"))
    kept = [json.loads(line) for line in (tmp_path / "replay" / "kept.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "replay" / "rs_sft.json").read_text())
    count = round(1.5 * len(kept))
    assert summary["replayed"] == count > len(pool)
    drawn = replay_conversations(pool, count, cfg.data.seed, 0)
    assert len(drawn) == count and all(sum(c == m for c in drawn[:3]) == 1 for m in pool)  # no repeat in a pass
    assert drawn == replay_conversations(pool, count, cfg.data.seed, 0) != replay_conversations(pool, count, 1, 0)

    def assistant_text(messages: list[dict]) -> str:
        return "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")

    expected = [assistant_text(k["messages"]) for k in kept] + [assistant_text(m) for m in drawn]
    assert sorted(trained_texts(stage.packed, tokenizer)) == sorted(expected)
    with pytest.raises(ConfigError, match=r"rs_sft.replay/rs_sft.replay_fraction: set both"):
        config_from_dict(rs_config(chat_run, tmp_path, "bad", replay_fraction=0.5))


def test_rs_sft_rounds_sample_from_the_trained_policy_and_resume_exactly(chat_run, tmp_path):
    """rs_sft.rounds=3, 2 steps each: every round writes its dialogues, kept set, summary and
    histogram (round k > 0 under rounds/<k>/) and rs_sft.json lists the three rounds. A run
    halted at the end of round 0 generates round 1 from its checkpoint, i.e. from the policy
    after round 0's training, and ends with the same dialogues and losses as the straight run."""
    def config(name: str) -> dict:
        cfg = rs_config(chat_run, tmp_path, name, rounds=3)
        cfg["train"]["steps"] = 6
        return cfg

    straight = train(config_from_dict(config("straight")))
    run_dir = tmp_path / "straight"
    summary = json.loads((run_dir / "rs_sft.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2] and len(straight.losses) == 6

    def dialogues(run: Path, index: int) -> list[str]:
        folder = run / "rounds" / str(index) if index else run
        return (folder / "dialogues.jsonl").read_text().splitlines()

    for index in (1, 2):
        folder = run_dir / "rounds" / str(index)
        assert len(dialogues(run_dir, index)) == 12 and (folder / "rs_sft_scores.png").is_file()
        kept = json.loads((folder / "rs_sft.json").read_text())["kept"]
        assert kept == len((folder / "kept.jsonl").read_text().splitlines()) == summary["rounds"][index]["kept"]
        assert dialogues(run_dir, index) != dialogues(run_dir, 0)
    halted = config("resumed")
    halted["train"]["exit_at_step"] = 2  # round 0 trained, round 1 not generated yet
    train(config_from_dict(halted))
    assert not (tmp_path / "resumed" / "rounds").exists()
    halted["train"]["exit_at_step"] = 0
    resumed = train(config_from_dict(halted), resume=True)
    assert resumed.losses == straight.losses[2:]
    for index in range(3):
        assert dialogues(tmp_path / "resumed", index) == dialogues(run_dir, index)
    resumed_summary = json.loads((tmp_path / "resumed" / "rs_sft.json").read_text())
    assert [r["round"] for r in resumed_summary["rounds"]] == [0, 1, 2]
    halted["train"]["exit_at_step"] = 5  # in round 2: a resume there reads round 1's summary back
    train(config_from_dict(halted), overwrite=True)
    train(config_from_dict({**halted, "train": {**halted["train"], "exit_at_step": 0}}), resume=True)
    assert [r["round"] for r in json.loads((tmp_path / "resumed" / "rs_sft.json").read_text())["rounds"]] == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"train.steps: 5 steps do not split into rs_sft.rounds=3"):
        bad = config("bad")
        bad["train"]["steps"] = 5
        config_from_dict(bad)


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


def test_dialogue_eval_reports_scores_retention_and_late_rules(chat_model, tmp_path):
    """Greedy dialogues of the held-out seeds, scored per turn: the dialogue score is the mean
    of the rubric's dialogue scores; with one constraint rule (citation) the late retention is
    that rule's late pass rate; retention per turn averages the dialogues reaching the turn."""
    from megatron_domain.config import DialogueEvalConfig, JudgeConfig
    from megatron_domain.eval.dialogues import evaluate_dialogues

    model, tokenizer, _ = chat_model
    judge = JudgeConfig(kind="rubric", rules=[RubricRuleConfig(**FORMAT), RubricRuleConfig(**CITATION)])
    cfg = DialogueEvalConfig(seeds=str(write_seeds(tmp_path / "heldout.jsonl", 4)), turns=3, max_new_tokens=16,
                             late_turn=2, follow_ups=["what is module?"], judge=judge)
    result = evaluate_dialogues(model, tokenizer, cfg, torch.device("cpu"), max_seq_len=128)
    assert result["dialogues"] == 4 and result["mean_turns"] == 3.0 and len(result["retention_by_turn"]) == 3
    assert result["late_turns"] == 4 * 2
    assert result["late_retention"] == pytest.approx(result["late_rules"]["citation"])
    assert result["retention_by_turn"][0] > 0  # the chat model cites some asked-about words on turn 1
    late = result["retention_by_turn"][1:]
    assert result["late_retention"] == pytest.approx(sum(late) / len(late))  # every dialogue reaches turn 3
    assert 0.0 <= result["dialogue_score"] <= 1.0
    assert result["samples"][0]["messages"][0]["role"] == "user"


def test_role_swapped_view_of_a_dialogue():
    from megatron_domain.rollout.user_simulator import role_swapped

    messages = [{"role": "system", "content": "house rule"}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"}]
    assert role_swapped(messages, "play the user") == [
        {"role": "system", "content": "play the user"}, {"role": "assistant", "content": "q1"},
        {"role": "user", "content": "a1"}]


def test_model_played_user_writes_the_missing_follow_ups(chat_model, tmp_path):
    """Seeds without follow-ups and no scripted list: a local model (here the chat model
    itself) writes every user turn after the first, for all dialogues of a turn in one call."""
    from megatron_domain.rollout.user_simulator import ModelUser

    model, tokenizer, template = chat_model
    path = tmp_path / "bare.jsonl"
    path.write_text("".join(json.dumps({"id": f"b{i}", "user": f"what is {w}?"}) + "\n"
                            for i, w in enumerate(ALPHA_WORDS[:3])))
    seeds = read_seeds(path, 3)
    stop_ids, _ = stop_conditions(template, tokenizer)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=stop_ids)
    sampler = NativeSampler.for_tokenizer(model, tokenizer, torch.device("cpu"))
    calls = []
    generate = lambda prompts, p, s, progress: sampler.generate(prompts, p, s)  # noqa: E731
    user = ModelUser(generate, tokenizer, template, params, "You ask short questions.")

    def counted(messages, seeds_):
        calls.append(len(messages))
        return user(messages, seeds_)

    dialogues = generate_dialogues(generate, seeds, 2, [], template, tokenizer, params, ROOM, 0, simulate=counted)
    assert calls == [6, 6]  # turns 2 and 3, all 3 seeds x 2 dialogues at once
    for group in dialogues:
        for dialogue in group:
            assert [m["role"] for m in dialogue.messages] == ["user", "assistant"] * 3 and dialogue.finish == "turns"
    without = generate_dialogues(generate, seeds, 2, [], template, tokenizer, params, ROOM, 0)
    assert all(d.finish == "no_follow_up" and len(d.answers) == 1 for group in without for d in group)


def test_endpoint_user_asks_a_chat_server(tmp_path):
    """An OpenAI-compatible chat endpoint plays the user: it receives the instruction and the
    role-swapped dialogue, and its reply becomes the next user turn; a bad reply names the URL."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from megatron_domain.rollout.sampling import Completion
    from megatron_domain.rollout.user_simulator import EndpointUser

    received = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append(body)
            last = body["messages"][-1]["content"]
            content = f"and after '{last}'?" if body["model"] == "sim" else None
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}
                              if content else {"error": "no"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        seeds = [parse_seed({"id": "e", "user": "hello", "turns": 2}, "x:1", 2, 0)]
        params = SamplingParams(max_new_tokens=8, temperature=0.0)
        answer = lambda prompts, p, s, progress: [Completion(i, 0, [1], f"answer {i}", [0.0], "stop")  # noqa: E731
                                                   for i in range(len(prompts))]
        template = load_template("chatml")
        tokenizer = load_tokenizer(write_tokenizer(tmp_path))
        user = EndpointUser(url, "sim", "Play the user.", params)
        dialogue = generate_dialogues(answer, seeds, 1, [], template, tokenizer, params, 1000, 0, simulate=user)[0][0]
        assert dialogue.messages[2] == {"role": "user", "content": "and after 'answer 0'?"}
        assert received[0]["messages"][0] == {"role": "system", "content": "Play the user."}
        assert received[0]["messages"][-1] == {"role": "user", "content": "answer 0"}
        with pytest.raises(ValueError, match=rf"rs_sft.user_url {url}: the reply is not an OpenAI chat completion"):
            EndpointUser(url, "other", "Play the user.", params)([[{"role": "user", "content": "x"}]], [0])
    finally:
        httpd.shutdown()
        httpd.server_close()


def write_tokenizer(tmp_path: Path) -> Path:
    """A small BPE with the chatml markers, for tests that only need to tokenize."""
    from megatron_domain.data.tokenizer import CHATML_SPECIALS, train_bpe_tokenizer

    train_bpe_tokenizer(["hello answer and after what is"] * 20, 300, tmp_path / "tok.json", CHATML_SPECIALS)
    return tmp_path / "tok.json"


def test_train_on_passing_trains_only_the_turns_the_rubric_passed(chat_model):
    """`train_on: passing`: a failed turn stays as context and gets no loss; `all` trains every
    generated turn; assistant turns of the seed's opening are never trained."""
    from megatron_domain.data.chat import encode_conversation
    from megatron_domain.stages.rs_sft import trained_turns

    _, tokenizer, template = chat_model
    messages = [{"role": "user", "content": "what is list?"}, {"role": "assistant", "content": "given by the seed."},
                {"role": "user", "content": "what is module?"}, {"role": "assistant", "content": "good one."},
                {"role": "user", "content": "what is error?"}, {"role": "assistant", "content": "bad one."},
                {"role": "user", "content": "what is the?"}, {"role": "assistant", "content": "good two."}]
    line = {"messages": messages, "opening": 3, "answer_token_ids": [[1], [1], [1]], "turn_scores": [1.0, 0.5, 1.0]}
    assert trained_turns(line, "all") == [False, True, True, True]
    assert trained_turns(line, "passing") == [False, True, False, True]
    ids, trained = encode_conversation(messages, template, tokenizer, trained_turns(line, "passing"))
    text = tokenizer.tokenizer.decode(ids[trained].tolist(), skip_special_tokens=False)
    assert text == "good one.<|im_end|>good two.<|im_end|>"
    with pytest.raises(ValueError, match="train_turns has 2 entries for 4 assistant messages"):
        encode_conversation(messages, template, tokenizer, [True, False])


@pytest.mark.slow
def test_rs_sft_under_tp2_and_dp_shard2_matches_one_process(chat_run, tmp_path):
    """Every rank samples the dialogues in lockstep (the forwards are collective), rank 0 judges
    and writes: tp=2 and dp_shard=2 write the same dialogues.jsonl and reach the same losses."""
    from parallel_cases import run_jobs
    from parallel_harness import run_on_ranks

    base = train_tp_splittable_chat_model(chat_run, tmp_path)

    def cfg(name: str, parallel: dict) -> dict:
        out = rs_config(chat_run, tmp_path, name, dialogues_per_seed=2, seeds_per_chunk=2)
        out["model"] = {"preset": "tiny-test", "init_from": base}
        out["parallel"] = parallel
        out["train"].update(micro_batch_size=1, global_batch_size=2)  # one row per dp rank
        return out

    reference = train(config_from_dict(cfg("one", {}))).losses
    run_on_ranks(2, run_jobs, [("dp2", "train", cfg("dp2", {"dp_shard": 2}), None),
                               ("tp2", "train", cfg("tp2", {"tp": 2}), None)], str(tmp_path))
    lines = lambda name: sorted((tmp_path / name / "dialogues.jsonl").read_text().splitlines())  # noqa: E731
    assert len(lines("one")) == 6
    for name in ("dp2", "tp2"):
        losses = torch.load(tmp_path / f"{name}.pt", weights_only=False)
        assert len(losses) == len(reference) and max(abs(a - b) for a, b in zip(losses, reference)) <= 1e-5, name
        assert lines(name) == lines("one"), name


def gold_seed(where: str = "seeds.jsonl:1"):
    """A three-turn seed with gold answers for turns 1 and 2 (turn 2's is one the citation
    rule fails), none for turn 3."""
    return parse_seed({"id": "g0", "user": "what is list?", "source": "list", "gold": "a list. [source: `list`]",
                       "follow_ups": [{"content": "what is module?", "source": "module",
                                       "gold": "a module. [source: `list`]"},
                                      {"content": "and error?", "source": "error"}]}, where, 3, 0)


def test_gold_corrections_replace_failed_turns_that_pass_the_rubric():
    """rs_sft.gold_field: a failed turn with a gold answer that passes the rubric is replaced
    and marked for training; a gold answer the rubric fails is put back (rejected); a failed
    turn without one stays (counted); a passing turn is never touched, and a gold answer holds
    for its own turn only."""
    from megatron_domain.stages.corrections import correct_with_gold, gold_answer
    from megatron_domain.stages.rs_sft import trained_turns

    judge = RubricJudge([RubricRuleConfig(**FORMAT), RubricRuleConfig(**CITATION)])
    seed = gold_seed()
    assert [gold_answer(seed, t, "gold", []) for t in (1, 2, 3)] == [
        "a list. [source: `list`]", "a module. [source: `list`]", None]  # not carried over to turn 3
    fields = [{"source": "list"}, {"source": "module"}, {"source": "error"}]
    answers = ["wrong. [source: `tuple`]", "wrong again.", "no idea."]
    messages = [{"role": "user", "content": "what is list?"}, {"role": "assistant", "content": answers[0]},
                {"role": "user", "content": "what is module?"}, {"role": "assistant", "content": answers[1]},
                {"role": "user", "content": "and error?"}, {"role": "assistant", "content": answers[2]}]
    dialogue = Dialogue("g0", 0, messages, opening=1, turn_fields=fields, answer_token_ids=[[1]] * 3, finish="turns")
    line = {"messages": messages, "opening": 1, "answer_token_ids": [[1]] * 3,
            **vars(rubric_dialogue_score(judge, dialogue))}
    assert line["turn_scores"] == [0.5, 0.0, 0.0]
    corrected, counts = correct_with_gold(line, dialogue, seed, "gold", [], judge)
    assert [m["content"] for m in corrected["messages"] if m["role"] == "assistant"] == [
        "a list. [source: `list`]", "wrong again.", "no idea."]
    assert corrected["gold_turns"] == [1]
    assert (counts.gold_turns, counts.gold_rejected, counts.failed_without_gold) == (1, 1, 1)
    assert line["messages"][1]["content"] == answers[0]  # the original line is unchanged
    assert trained_turns(corrected, "passing") == [True, False, False]
    passing = {**line, "turn_scores": [1.0, 0.0, 0.0]}  # a passing turn keeps the policy's answer
    kept, counts = correct_with_gold(passing, dialogue, seed, "gold", [], judge)
    assert kept["messages"][1]["content"] == answers[0] and kept["gold_turns"] == [] and counts.gold_turns == 0


def test_gold_field_errors_name_the_seed_line_or_the_key(chat_run, tmp_path):
    from megatron_domain.stages.corrections import check_gold_field

    seeds = [gold_seed()]
    with pytest.raises(ValueError, match=r"rs_sft.gold_field: no seed of s.jsonl has the key 'answer'"):
        check_gold_field(seeds, "answer", [], "s.jsonl")
    empty = parse_seed({"id": "e", "user": "q", "follow_ups": [{"content": "q2", "gold": " "}]}, "s.jsonl:4", 2, 0)
    with pytest.raises(ChatDataError, match=r"s.jsonl:4: seed 'e': 'gold' \(rs_sft.gold_field\) of turn 2 must be a "
                                            r"non-empty answer or null"):
        check_gold_field(seeds + [empty], "gold", [], "s.jsonl")
    pairwise = rs_config(chat_run, tmp_path, "bad", gold_field="gold")
    pairwise["rs_sft"]["judge"] = {"kind": "pairwise", "model": "x"}
    with pytest.raises(ConfigError, match=r"rs_sft.gold_field: gold corrections replace the turns a judge failed"):
        config_from_dict(pairwise)


def test_rs_sft_trains_the_gold_answers_of_failed_turns(chat_run, tmp_path):
    """An rs_sft run with gold answers on every turn and train_on: passing: the kept dialogues
    hold the gold answer wherever the policy failed (kept.jsonl, counted in rs_sft.json), and
    the trained tokens are exactly the passing turns and the gold answers."""
    from megatron_domain.stages import StageContext
    from megatron_domain.stages.rs_sft import RsSftStage

    seeds = tmp_path / "gold_seeds.jsonl"
    lines = [json.loads(line) for line in write_seeds(seeds).read_text().splitlines()]
    for line in lines:
        line["gold"] = f"the {line['source']}. [source: `{line['source']}`]"
        for item in line["follow_ups"]:
            item["gold"] = f"the {item['source']}. [source: `{item['source']}`]"
    seeds.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cfg = config_from_dict(rs_config(chat_run, tmp_path, "gold", seeds=str(seeds), gold_field="gold",
                                     train_on="passing", turns=2))
    train(cfg)
    kept = [json.loads(line) for line in (tmp_path / "gold" / "kept.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "gold" / "rs_sft.json").read_text())
    failed = sum(score < 1.0 for line in kept for score in line["turn_scores"])
    assert failed > 0  # the tiny model fails some turns: the test needs them
    assert summary["gold_turns"] == sum(len(line["gold_turns"]) for line in kept) == failed
    assert summary["gold_rejected"] == summary["failed_without_gold"] == 0
    for line in kept:
        answers = [m["content"] for m in line["messages"][line["opening"]:] if m["role"] == "assistant"]
        sources = [fields["source"] for fields in line["turn_fields"]]
        for turn in line["gold_turns"]:
            assert answers[turn - 1] == f"the {sources[turn - 1]}. [source: `{sources[turn - 1]}`]"
    tokenizer = load_tokenizer(chat_run["tokenizer"])
    stage = RsSftStage()
    stage.setup(StageContext(cfg=cfg, tokenizer=tokenizer, device=torch.device("cpu"), run_dir=tmp_path / "gold"))
    expected = ["".join(m["content"] + "<|im_end|>" for m in line["messages"] if m["role"] == "assistant")
                for line in kept]  # every generated turn either passed or now holds its gold answer
    assert sorted(trained_texts(stage.packed, tokenizer)) == sorted(expected)


def test_rs_sft_replays_raw_text_for_every_planned_step(chat_run, tmp_path):
    """data.chat.replay with train.steps 0 (rs_sft.epochs decide the steps): every planned
    step gets its raw-text rows; the stream was sized before the steps were known and ran out
    at the second micro-batch."""
    from megatron_domain.data.indexed import write_indexed_dataset
    from megatron_domain.data.preprocess import tokenize_documents
    from conftest import BETA_WORDS, synthetic_documents

    tokenizer = load_tokenizer(chat_run["tokenizer"])
    corpora = []
    for i, words in enumerate((ALPHA_WORDS, BETA_WORDS)):  # a blend: its size is what the stage asks for
        prefix = tmp_path / f"raw{i}"
        write_indexed_dataset(prefix, tokenize_documents(iter(synthetic_documents(words, 40, seed=4)), tokenizer,
                                                         progress=False), tokenizer.vocab_size)
        corpora.append({"name": f"raw{i}", "path": str(prefix), "weight": 0.5})
    cfg = rs_config(chat_run, tmp_path, "raw_replay", epochs=3)
    cfg["data"]["corpora"] = corpora
    cfg["data"]["chat"] = {"template": "chatml", "replay": 0.5}
    result = train(config_from_dict(cfg))
    steps = json.loads((tmp_path / "raw_replay" / "config.json").read_text())["train"]["steps"]
    assert steps > 1 and len(result.losses) == steps
