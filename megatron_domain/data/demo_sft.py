"""The demo's SFT data: question/answer pairs in a fixed house format, built from the domain
corpus (the language reference topics). Every answer is one line, the first sentence of the
topic's text (at most 14 words), ending with a citation of the topic it comes from:

    Assert statements are a convenient way to insert debugging assertions into a program. [source: `assert`]

The topic id is cited in backticks exactly as the question quotes it, so the citation is the same
token sequence as the question's mention (the demo tokenizer splits ` assert` and `` `assert` ``
differently; measured: with a bare `[source: assert]` a 1M-parameter model learned the format but
cited the right topic for <10% of held-out questions).

Each topic is asked in the four QUESTIONS phrasings and in two of MID_QUESTIONS, which name the
topic before a few more words. One conversation per topic has two to four question/answer turns
(MULTI_TURNS) under the dialogue rule. The held-out
questions ask every topic in six phrasings that no training file uses (EVAL_QUESTIONS), so they
measure whether the model answers new questions in the house format and cites the right section.

Out-of-scope questions ask the same way about topics the reference does not contain
(OUT_OF_SCOPE_TOPICS: cooking, geography, music, ...); the house rule is to answer them with the
fixed REFUSAL sentence. The SFT data shows that sentence for a few such topics only
(`demo_data.sft_refusal_topics`), so the SFT model knows it but not the rule; the DPO stage's prompts
(dpo_prompts.jsonl: the training phrasings of every topic, with the topic id to cite as
`source`, plus out-of-scope questions without one, about the held-in out-of-scope topics and
EXTRA_OUT_OF_SCOPE_TOPICS in OOS_DPO_PHRASINGS phrasings each, mid phrasings included) teach the rule through a rubric judge, and
the held-out questions (sft_heldout.jsonl) include out-of-scope topics never used in training.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from megatron_domain.data.demo_corpus import is_heldout

QUESTIONS = ("What does the language reference say about `{name}`?", "Explain `{name}` in Python.",
             "Tell me about `{name}`.", "How does Python define `{name}`?")
# phrasings that name the topic before a few more words: two per topic (chosen per topic) join the
# four above in the SFT data. With the four alone (the topic at or next to the end) the model
# learned where to look, not what: measured on the held-out "Summarize `x` in one sentence."
# it cited the right topic for 5 of 38 questions (What is `x`?: 24 of 34), and online DPO on
# prompts with such tails left their citation at 16-18% over 32 rounds.
MID_QUESTIONS = ("Describe `{name}` in a few words.", "Explain `{name}` briefly, please.",
                 "Give me the reference entry for `{name}` in plain words.", "Outline `{name}` for a newcomer.",
                 "Define `{name}` in one line.", "Recap `{name}` concisely.",
                 "Can you explain `{name}` in simple terms?", "Tell me about `{name}` in short.",
                 "Characterize `{name}` in a nutshell.", "Sketch `{name}` for me, quickly.")
MID_PER_TOPIC = 2
HELDOUT_QUESTIONS = ("Summarize `{name}` in one sentence.", "What is `{name}`?")
# the single-turn eval (sft_heldout.jsonl) asks every topic in these: HELDOUT_QUESTIONS (which
# the held-out dialogues use too) and four more that no data file uses. With the first two alone,
# on half the topics (72 in-scope questions, one = 1.4 points), rounding-level changes moved the
# DPO stage's citation accuracy by 7-11 points: measured in the sixteenth session from one SFT
# model (70.8% there, 69.2% on 770 questions in ten other unseen phrasings), six DPO runs scored
# 69.4-76.4% there and 79.9-83.2% on the 770
EVAL_QUESTIONS = HELDOUT_QUESTIONS + ("What is `{name}` used for?", "Give me the gist of `{name}`.",
                                      "In one sentence, what is `{name}`?",
                                      "How is `{name}` described in the reference?")
# the DPO prompts add phrasings of their own (none of them held out), so that the topic, not the
# wording, is what tells an in-scope question from an out-of-scope one
DPO_QUESTIONS = QUESTIONS + ("Describe `{name}`.", "Give me the reference entry for `{name}`.",
                             "I need to know about `{name}`.", "Can you explain `{name}` briefly?",
                             "Explain `{name}` in one line.", "Tell me about `{name}` in a few words.",
                             "Define `{name}`.", "What do we know about `{name}`?")
# phrasings only the DPO prompts use, every one for every topic. Measured from one SFT model
# (thirteenth session; held-out citation / format / out-of-scope refusals, SFT 70.8 / 93.1 / 6.0):
# the DPO stage with DPO_QUESTIONS alone -> 79.2 / 94.4 / 42; + eight of these per topic 77.8 /
# 94.4 / 36; + the gold answers (dpo.gold_field) 81.9 / 97.2 / 32; + 5 phrasings per out-of-scope
# topic 84.7 / 97.2 / 40. Sixteenth session, from another SFT model, on 770 questions in ten
# unseen phrasings (citation; SFT 69.2%): eight per topic -> 79.9-83.2% over six runs, all 24 ->
# 84.3 and 85.1% (two rollout seeds): the more ways a topic is asked in training, the better the
# policy answers it when asked in a new one
DPO_EXTRA_QUESTIONS = (
    "Please explain `{name}`.", "What can you tell me about `{name}`?", "Give a short description of `{name}`.",
    "Briefly, what is meant by `{name}`?", "I want a summary of `{name}`.", "Say something about `{name}`.",
    "What's `{name}` about?", "Quick question: `{name}`?", "Help me understand `{name}`.",
    "Explain the meaning of `{name}`.", "Tell me what `{name}` means.", "Give an overview of `{name}`.",
    "What is meant by `{name}` in Python?", "Could you describe `{name}`?", "Please define `{name}` for me.",
    "Any notes on `{name}`?", "What does `{name}` refer to?", "I am curious about `{name}`.",
    "Give me a one-line answer about `{name}`.", "Review `{name}` quickly.", "Walk me through `{name}`.",
    "Clarify `{name}`, please.", "Teach me `{name}`.", "Remind me what `{name}` is for.")
MAX_WORDS = 14
# question/answer turns of the SFT data's multi-turn conversations (one per topic, cycling): the
# rs_sft stage's dialogues have six, and a model trained on two-turn conversations only lost the
# citation after turn 2 (measured on the DPO checkpoint, held-out dialogues: turns 1-6 cited right
# 75/54/21/0/0/0%); four turns (~230 tokens) still fit the SFT stage's 256-token rows
MULTI_TURNS = (2, 3, 4)
REFUSAL = "I cannot answer that from the reference."
DIALOGUE_RULE = "Answer in one sentence and cite the reference topic."  # also the SFT data's multi-turn system prompt
OUT_OF_SCOPE_TOPICS = (
    "photosynthesis", "volcanoes", "knitting", "opera", "glaciers", "sourdough", "tax-returns", "basketball",
    "tomatoes", "violins", "earthquakes", "origami", "coffee-roasting", "marathons", "penguins", "saffron",
    "tides", "chess-openings", "beekeeping", "pottery", "rainbows", "tennis", "vineyards", "sculpture",
    "monsoons", "cheese-making", "ballet", "deserts", "orchids", "surfing", "lighthouses", "mushrooms",
    "snowflakes", "jazz", "pyramids", "dolphins", "carpentry", "hurricanes", "tea-ceremonies", "kites",
    "coral-reefs", "falconry", "pastry", "rowing", "tulips", "comets", "weaving", "bagpipes",
    "fjords", "gardening", "sailing", "mosaics", "avalanches", "bread-baking", "canoes", "harvests",
    "lanterns", "meadows", "pianos", "quilting", "reindeer", "savannas", "typhoons", "walnuts")
# more out-of-scope topics for training only (never held out): with the held-in share of the
# list above alone (~38 topics) online DPO learned to refuse those topics rather than topics
# the reference lacks (in its rounds it refused ~half of its samples on them; held-out
# out-of-scope questions: 16%)
EXTRA_OUT_OF_SCOPE_TOPICS = tuple("""
    astronomy badminton bicycles botany calligraphy camping candles caravans cathedrals ceramics cherries
    chocolate cinnamon cricket crochet dinosaurs diving dragonflies drums eclipses embroidery fencing ferns
    fireworks fishing flamingos flutes fossils foxes gemstones geysers giraffes gliders gondolas granite harps
    hedgehogs herbs hiking honey horses icebergs jellyfish juggling kangaroos kayaks lavender lemons lichens
    lobsters maple-syrup marbles meteors mountains nebulas oak-trees olives orangutans ostriches owls pandas
    parrots peaches pearls pelicans peppers pineapples puffins quartz rabbits raccoons redwoods rhubarb rivers
    rugby saddles salmon sandcastles scarecrows seahorses seashells skiing sloths snails sparrows spices
    squirrels starfish strawberries sunflowers swans telescopes thunderstorms tigers tortoises trumpets tundra
    turtles umbrellas volleyball waterfalls whales wheat windmills wolves yoga zebras""".split())
TRAINING_PHRASINGS = tuple(dict.fromkeys(DPO_QUESTIONS + MID_QUESTIONS + DPO_EXTRA_QUESTIONS))  # every held-in one
# phrasings per out-of-scope topic, of all the DPO ones (chosen per topic, seeded): the share of
# out-of-scope prompts trades in-scope refusals against out-of-scope ones. Sixteenth session, from
# one SFT model, with dpo.anchors, on the eval's 612 questions (refusals in / out of scope, SFT
# 0.6 / 2.7%): 5 -> 1.9 / 20.0 (beta 0.2), 2.2 / 22.0 (beta 0.4), 2.2 / 20.7 (beta 0.8); 7 -> 4.5 /
# 28.0 (beta 0.4); 8 -> 3.5 / 26.0 (beta 0.4); 9 -> 6.3 / 34.7 (beta 0.4), 6.1 / 35.3 (beta 0.8)
OOS_DPO_PHRASINGS = 9
SENTENCE = re.compile(r"^(.{20,220}?[.!?:])(\s|$)", re.S)


def first_sentence(text: str) -> str | None:
    """The first prose sentence of a topic (headings and code lines skipped), one line."""
    for paragraph in text.split("\n\n"):
        line = " ".join(paragraph.split())
        if not line or set(line) <= set("=*-~^ ") or paragraph.startswith((" ", "\t", ">>>")):
            continue
        match = SENTENCE.match(line)
        if match and "[" not in match.group(1):
            words = match.group(1)[:-1].split()
            return " ".join(words[:MAX_WORDS]).rstrip(",;:") + "."
    return None


def topic_name(topic: str) -> str:
    """How questions refer to a topic: by its id, so the citation can be checked exactly."""
    return topic


def house_answer(sentence: str, topic: str) -> str:
    """The house format: one sentence, then `` [source: `<topic>`]``."""
    return f"{sentence} [source: `{topic}`]"


def mid_questions(topic: str, seed: int) -> tuple[str, ...]:
    """The MID_PER_TOPIC phrasings of MID_QUESTIONS the SFT data asks about `topic` (fixed by
    topic and seed)."""
    return tuple(random.Random(f"{seed}:{topic}").sample(MID_QUESTIONS, MID_PER_TOPIC))


def multi_turn_conversation(pairs: list[tuple[str, str]], index: int, seed: int) -> dict:
    """One SFT conversation of MULTI_TURNS[index % len] question/answer turns under the dialogue
    rule, opening with topic `index` of `pairs` ((topic, sentence)) and following up on others, each
    asked in one of its training phrasings (QUESTIONS or its mid_questions; never a held-out one)."""
    turns = MULTI_TURNS[index % len(MULTI_TURNS)]
    rng = random.Random(f"{seed}:multi:{index}")
    messages = [{"role": "system", "content": DIALOGUE_RULE}]
    follow_ups = rng.sample([j for j in range(len(pairs)) if j != index], turns - 1)
    for j in [index] + follow_ups:
        topic, sentence = pairs[j]
        template = rng.choice(QUESTIONS + mid_questions(topic, seed))
        messages += [{"role": "user", "content": template.format(name=topic_name(topic))},
                     {"role": "assistant", "content": house_answer(sentence, topic)}]
    return {"messages": messages}


def out_of_scope_split(heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(training, held-out) out-of-scope topics: the held-out ones (a share of OUT_OF_SCOPE_TOPICS)
    never appear in any training data; training gets the rest, then EXTRA_OUT_OF_SCOPE_TOPICS."""
    heldout = [t for t in OUT_OF_SCOPE_TOPICS if is_heldout(f"oos:{t}", max(heldout_fraction, 0.4), seed)]
    return [t for t in OUT_OF_SCOPE_TOPICS if t not in heldout] + list(EXTRA_OUT_OF_SCOPE_TOPICS), heldout


def build_demo_sft(out_dir: str | os.PathLike, heldout_fraction: float, seed: int, refusal_topics: int = 6,
                   rs_seeds: int = 32, rs_heldout_seeds: int = 12, turns: int = 6, single_seeds: int = 0) -> dict:
    """Write sft_train.jsonl (conversations), dpo_prompts.jsonl ({"prompt"[, "source", "answer"]}),
    sft_heldout.jsonl ({"prompt", "source", "answer"}; source null = out of scope, no answer), rs_seeds.jsonl and
    rs_heldout_seeds.jsonl (multi-turn seeds, see `dialogue_seeds`) to `out_dir`; returns their
    counts. `refusal_topics`: out-of-scope topics whose refusal the SFT data shows (one
    question each)."""
    from pydoc_data.topics import topics

    pairs = []
    for topic in sorted(topics):
        sentence = first_sentence(topics[topic])
        if sentence:
            pairs.append((topic, sentence))
    conversations = []
    for i, (topic, sentence) in enumerate(pairs):
        for template in QUESTIONS + mid_questions(topic, seed):
            conversations.append({"messages": [
                {"role": "user", "content": template.format(name=topic_name(topic))},
                {"role": "assistant", "content": house_answer(sentence, topic)}]})
        conversations.append(multi_turn_conversation(pairs, i, seed))
    oos_train, oos_heldout = out_of_scope_split(heldout_fraction, seed)
    for i, topic in enumerate(oos_train[:refusal_topics]):
        phrasings = QUESTIONS + MID_QUESTIONS  # the refusal follows the topic, not the phrasing
        conversations.append({"messages": [{"role": "user", "content": phrasings[i % len(phrasings)].format(name=topic)},
                                           {"role": "assistant", "content": REFUSAL}]})
    out = Path(out_dir)
    _write_jsonl(out / "sft_train.jsonl", conversations)
    dpo_prompts = [{"prompt": template.format(name=topic_name(t)), "source": t, "answer": house_answer(sentence, t)}
                   for t, sentence in pairs for template in DPO_QUESTIONS + mid_questions(t, seed)]
    dpo_prompts += [{"prompt": template.format(name=topic_name(t)), "source": t, "answer": house_answer(sentence, t)}
                    for t, sentence in pairs for template in DPO_EXTRA_QUESTIONS]
    dpo_prompts += [{"prompt": template.format(name=t)} for t in sorted(oos_train) for template in
                    random.Random(f"{seed}:oos:{t}").sample(DPO_QUESTIONS + MID_QUESTIONS + DPO_EXTRA_QUESTIONS,
                                                            OOS_DPO_PHRASINGS)]
    _write_jsonl(out / "dpo_prompts.jsonl", dpo_prompts)
    heldout = [{"prompt": template.format(name=topic_name(t)), "source": t, "answer": sentence}
               for t, sentence in pairs for template in EVAL_QUESTIONS]
    heldout += [{"prompt": template.format(name=t), "source": None} for t in oos_heldout
                for template in EVAL_QUESTIONS]
    _write_jsonl(out / "sft_heldout.jsonl", heldout)
    seeds, heldout_seeds = dialogue_seeds([t for t, _ in pairs], rs_seeds, rs_heldout_seeds, turns,
                                          (oos_train, oos_heldout), dict(pairs))
    seeds += single_turn_seeds(pairs, oos_train, single_seeds, seed)
    _write_jsonl(out / "rs_seeds.jsonl", seeds)
    _write_jsonl(out / "rs_heldout_seeds.jsonl", heldout_seeds)
    return {"sft_train": len(conversations), "sft_heldout": len(heldout), "topics": len(pairs),
            "dpo_prompts": len(dpo_prompts), "out_of_scope_heldout": len(oos_heldout), "rs_seeds": len(seeds),
            "rs_heldout_seeds": len(heldout_seeds)}


def single_turn_seeds(pairs: list[tuple[str, str]], out_of_scope: list[str], count: int, seed: int) -> list[dict]:
    """`count` one-turn rs_sft seeds without the dialogue rule, alternating an in-scope topic
    (a training phrasing, its `source` and `answer`) and a training out-of-scope one (no
    source): kept among the dialogues, they hold the single-turn answers and refusals in place,
    which training on multi-turn dialogues alone wore down."""
    rng = random.Random(f"{seed}:single")
    out = []
    for i in range(count):
        phrasing = rng.choice(TRAINING_PHRASINGS)
        if i % 2 == 0:
            topic, sentence = rng.choice(pairs)
            out.append({"id": f"u{i}", "user": phrasing.format(name=topic), "source": topic, "answer": sentence,
                        "gold": house_answer(sentence, topic), "turns": 1})
        else:
            topic = rng.choice(out_of_scope)
            out.append({"id": f"u{i}", "user": phrasing.format(name=topic), "source": None, "answer": None,
                        "gold": REFUSAL, "turns": 1})
    return out


def dialogue_seeds(topics: list[str], count: int, heldout_count: int, turns: int,
                   out_of_scope: tuple[list[str], list[str]] = ([], []),
                   answers: dict[str, str] | None = None) -> tuple[list[dict], list[dict]]:
    """rs_sft seeds (training) and held-out seeds for the multi-turn eval: the house rule is
    stated in turn 1 (system prompt and constraints), the opening asks about one topic and each
    follow-up about another, with the topic to cite as that turn's `source`. Every other seed
    asks one middle follow-up (turns 2 .. turns-1) about an out-of-scope topic of
    `out_of_scope` (training, held-out) instead, with no source: the house rule there is the
    refusal, and the turn after it is in scope again. Each seed samples its own topic sequence. With `answers` ({topic: reference
    sentence}) every in-scope turn also carries its `answer` (a rubric rule can then require the
    reference's words, not only the citation), and every turn its known-good reply as `gold` (the
    house answer; none on the out-of-scope turn; rs_sft.gold_field). Training seeds ask in every
    held-in phrasing (TRAINING_PHRASINGS), held-out seeds use other topic sequences, the held-out
    phrasings and the held-out out-of-scope topics."""
    answers = answers or {}

    def facts(topic: str | None) -> dict:
        if not answers:
            return {"source": topic}
        gold = house_answer(answers[topic], topic) if topic else None
        return {"source": topic, "answer": answers.get(topic), "gold": gold}

    def seed(i: int, phrasings: tuple[str, ...], offset: int, oos_topics: list[str]) -> dict:
        # a seeded sample per seed (the split in the name): the earlier (offset + 11 i + 7 k) mod 77
        # repeated every 7 seeds, so 24 held-out seeds held 7 topic sequences (and 32 training seeds 7)
        chosen = random.Random(f"dialogue:{offset}:{i}").sample(topics, turns)
        follow_ups = [{"content": phrasings[(i + k) % len(phrasings)].format(name=t), **facts(t)}
                      for k, t in enumerate(chosen[1:], 1)]
        if oos_topics and i % 2 and turns > 2:
            k = 1 + (i // 2) % (turns - 2)  # a follow-up before the last turn
            topic = oos_topics[(i // 2) % len(oos_topics)]
            follow_ups[k - 1] = {"content": phrasings[(i + k) % len(phrasings)].format(name=topic), **facts(None)}
        return {"id": f"{'h' if offset else 's'}{i}", "system": DIALOGUE_RULE,
                "user": phrasings[i % len(phrasings)].format(name=chosen[0]), **facts(chosen[0]),
                "constraints": ["answer in one sentence", "cite the reference topic of every answer",
                                "refuse questions the reference does not cover"], "turns": turns,
                "follow_ups": follow_ups}
    return ([seed(i, TRAINING_PHRASINGS, 0, out_of_scope[0]) for i in range(count)],
            [seed(i, HELDOUT_QUESTIONS, len(topics) // 2 + 1, out_of_scope[1]) for i in range(heldout_count)])


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
