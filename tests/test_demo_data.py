"""The demo's chat data (data/demo_sft.py): the held-out questions stay held out, the SFT
data asks about every topic in phrasings that put the topic before the end of the question and
in multi-turn conversations, and the rs_sft seeds mix out-of-scope turns into the dialogues."""

from __future__ import annotations

import json
from pathlib import Path

from pydoc_data.topics import topics

from megatron_domain.data.demo_sft import (DIALOGUE_RULE, DPO_EXTRA_QUESTIONS, DPO_QUESTIONS, EVAL_QUESTIONS,
                                           HELDOUT_QUESTIONS, MID_PER_TOPIC, MID_QUESTIONS, MULTI_TURNS,
                                           OOS_DPO_PHRASINGS, QUESTIONS, REFUSAL, TRAINING_PHRASINGS, build_demo_sft,
                                           first_sentence, house_answer, mid_questions, out_of_scope_split)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def user_turns(conversations: list[dict]) -> list[str]:
    """Every user message of the SFT conversations."""
    return [m["content"] for c in conversations for m in c["messages"] if m["role"] == "user"]


def test_heldout_questions_and_topics_never_appear_in_training_data(tmp_path):
    counts = build_demo_sft(tmp_path, heldout_fraction=0.5, seed=0, refusal_topics=20, rs_seeds=8,
                            rs_heldout_seeds=4, turns=4)
    heldout = read_jsonl(tmp_path / "sft_heldout.jsonl")
    assert len(heldout) == counts["sft_heldout"] and any(q["source"] is None for q in heldout)
    training_prompts = set(user_turns(read_jsonl(tmp_path / "sft_train.jsonl")))
    training_prompts |= {r["prompt"] for r in read_jsonl(tmp_path / "dpo_prompts.jsonl")}
    for seed in read_jsonl(tmp_path / "rs_seeds.jsonl"):
        training_prompts |= {seed["user"]} | {f["content"] for f in seed["follow_ups"]}
    assert not training_prompts & {q["prompt"] for q in heldout}
    training_text = "\n".join(sorted(training_prompts))
    for question in heldout:
        if question["source"] is None:  # an out-of-scope topic used in no training file at all
            topic = question["prompt"].split("`")[1]
            assert f"`{topic}`" not in training_text, topic
    for template in EVAL_QUESTIONS:  # the held-out phrasings are not training phrasings
        assert template not in QUESTIONS + MID_QUESTIONS + TRAINING_PHRASINGS
    # the single-turn eval asks every topic in every held-out phrasing (its first two are the
    # held-out dialogues' phrasings)
    assert EVAL_QUESTIONS[:len(HELDOUT_QUESTIONS)] == HELDOUT_QUESTIONS and len(set(EVAL_QUESTIONS)) == 6
    in_scope = [q for q in heldout if q["source"]]
    asked = {(q["source"], q["prompt"].replace(f"`{q['source']}`", "`{name}`")) for q in in_scope}
    assert len(asked) == len(in_scope) == counts["topics"] * len(EVAL_QUESTIONS)


def test_sft_asks_every_topic_with_the_topic_inside_the_question(tmp_path):
    build_demo_sft(tmp_path, heldout_fraction=0.5, seed=0, refusal_topics=0, rs_seeds=2, rs_heldout_seeds=1,
                   turns=2)
    asked = user_turns(read_jsonl(tmp_path / "sft_train.jsonl"))
    topics = {q.split("`")[1] for q in asked}
    assert len(topics) > 50
    for topic in topics:
        mid = mid_questions(topic, seed=0)
        assert len(set(mid)) == MID_PER_TOPIC and set(mid) <= set(MID_QUESTIONS)
        assert mid == mid_questions(topic, seed=0)  # fixed by topic and seed
        for template in mid:
            question = template.format(name=topic)
            assert question in asked
            assert question.split(f"`{topic}`")[1].strip(" .?!,")  # words after the topic
    assert len({mid_questions(t, seed=0) for t in topics}) > 10  # the phrasings vary between topics


def test_sft_multi_turn_conversations_cite_each_turns_topic(tmp_path):
    build_demo_sft(tmp_path, heldout_fraction=0.1, seed=0, refusal_topics=0, rs_seeds=2, rs_heldout_seeds=1,
                   turns=2)
    dialogues = [c["messages"] for c in read_jsonl(tmp_path / "sft_train.jsonl") if c["messages"][0]["role"] == "system"]
    turns = [sum(m["role"] == "assistant" for m in messages) for messages in dialogues]
    assert set(turns) == set(MULTI_TURNS) and len(dialogues) > 50
    for messages in dialogues:
        assert messages[0]["content"] == DIALOGUE_RULE
        topics = [m["content"].split("`")[1] for m in messages if m["role"] == "user"]
        assert len(set(topics)) == len(topics)  # a new topic every turn
        for question, answer in zip(messages[1::2], messages[2::2]):
            assert answer["content"].endswith(f"[source: `{question['content'].split('`')[1]}`]")
            assert question["content"] not in {t.format(name=question["content"].split("`")[1])
                                               for t in HELDOUT_QUESTIONS}


def test_dialogue_seeds_ask_out_of_scope_in_a_middle_turn(tmp_path):
    build_demo_sft(tmp_path, heldout_fraction=0.1, seed=0, refusal_topics=0, rs_seeds=8, rs_heldout_seeds=6,
                   turns=6, single_seeds=6)
    oos_train, oos_heldout = out_of_scope_split(0.1, seed=0)
    training = read_jsonl(tmp_path / "rs_seeds.jsonl")
    single = [seed for seed in training if seed["turns"] == 1]  # one-turn seeds without the dialogue rule
    assert len(training) == 14 and len(single) == 6 and not any("system" in seed for seed in single)
    answers = {q["source"]: q["answer"] for q in read_jsonl(tmp_path / "sft_heldout.jsonl") if q["source"]}
    for i, seed in enumerate(single):
        topic = seed["user"].split("`")[1]
        if i % 2:  # out of scope: no source, a training topic
            assert seed["source"] is None and topic in oos_train
        else:
            assert seed["source"] == topic and answers.get(topic, seed["answer"]) == seed["answer"]
    for name, allowed in (("rs_seeds.jsonl", oos_train), ("rs_heldout_seeds.jsonl", oos_heldout)):
        seeds = [seed for seed in read_jsonl(tmp_path / name) if seed["turns"] > 1]
        in_scope = [{seed["source"]} | {f["source"] for f in seed["follow_ups"] if f["source"]} for seed in seeds]
        for a, first in enumerate(in_scope):  # every seed its own topics, not a rerun of another's
            assert not any(first <= other for b, other in enumerate(in_scope) if b != a)
        for i, seed in enumerate(seeds):
            assert seed["source"] and seed["follow_ups"][-1]["source"]  # the first and the last turn in scope
            outside = [f for f in seed["follow_ups"] if f["source"] is None]
            assert len(outside) == i % 2  # every other seed
            for follow_up in outside:
                assert follow_up["content"].split("`")[1] in allowed
            for turn in [seed] + seed["follow_ups"]:  # rs_sft.gold_field: the house answer; none out of scope
                assert turn["gold"] == (f"{turn['answer']} [source: `{turn['source']}`]" if turn["source"] else None)
    for seed in single:
        assert seed["gold"] == (f"{seed['answer']} [source: `{seed['source']}`]" if seed["source"] else REFUSAL)
    # the training dialogues ask in every held-in phrasing, not a few (a few let rs_sft wear down
    # the answers to the others): the phrasing of each training turn, as a template
    multi = [seed for seed in training if seed["turns"] > 1]
    templates = {turn.replace(f"`{name}`", "`{name}`") for seed in multi
                 for turn, name in [(seed["user"], seed["source"])] + [(f["content"], f["content"].split("`")[1])
                                                                      for f in seed["follow_ups"]]}
    assert templates <= set(TRAINING_PHRASINGS) and len(templates) > 2 * len(QUESTIONS)


def test_dpo_prompts_carry_their_topics_reference_answer(tmp_path):
    """Every in-scope DPO prompt has the house answer of its topic as `answer` (the one the SFT
    data teaches, what dpo.gold_field reads), in the twelve DPO phrasings, its two mid ones and
    every DPO-only one; out-of-scope prompts have none."""
    build_demo_sft(tmp_path, heldout_fraction=0.1, seed=0, refusal_topics=4, rs_seeds=2, rs_heldout_seeds=1, turns=2)
    taught = {}
    for conversation in read_jsonl(tmp_path / "sft_train.jsonl"):
        messages = conversation["messages"]
        for question, answer in zip(messages, messages[1:]):
            if question["role"] == "user" and answer["role"] == "assistant" and "`" in question["content"]:
                taught.setdefault(question["content"].split("`")[1], set()).add(answer["content"])
    prompts = read_jsonl(tmp_path / "dpo_prompts.jsonl")
    by_topic: dict[str, list[str]] = {}
    out_of_scope: dict[str, set[str]] = {}
    for prompt in prompts:
        topic = prompt["prompt"].split("`")[1]
        if prompt.get("source") is None:
            assert "answer" not in prompt and taught.get(topic, {REFUSAL}) == {REFUSAL}
            out_of_scope.setdefault(topic, set()).add(prompt["prompt"].replace(f"`{topic}`", "`{name}`"))
            continue
        assert prompt["source"] == topic and prompt["answer"] == house_answer(first_sentence(topics[topic]), topic)
        assert taught[topic] == {prompt["answer"]}  # the answer SFT taught for the topic
        by_topic.setdefault(topic, []).append(prompt["prompt"])
    assert len(by_topic) > 50
    for topic, questions in by_topic.items():
        expected = DPO_QUESTIONS + mid_questions(topic, seed=0) + DPO_EXTRA_QUESTIONS
        assert sorted(questions) == sorted(t.format(name=topic) for t in expected)
    # every training out-of-scope topic in OOS_DPO_PHRASINGS held-in phrasings, chosen per topic
    assert set(out_of_scope) == set(out_of_scope_split(0.1, seed=0)[0])
    for templates in out_of_scope.values():
        assert len(templates) == OOS_DPO_PHRASINGS and templates <= set(TRAINING_PHRASINGS)
    assert len({frozenset(t) for t in out_of_scope.values()}) > 10
    for template in EVAL_QUESTIONS:
        assert template not in DPO_QUESTIONS + DPO_EXTRA_QUESTIONS
