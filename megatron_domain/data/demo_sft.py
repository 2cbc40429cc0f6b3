"""The demo's SFT data: question/answer pairs in a fixed house format, built from the domain
corpus (the language reference topics). Every answer is one line, the first sentence of the
topic's text (at most 14 words), ending with a citation of the topic it comes from:

    Assert statements are a convenient way to insert debugging assertions into a program. [source: `assert`]

The topic id is cited in backticks exactly as the question quotes it, so the citation is the same
token sequence as the question's mention (the demo tokenizer splits ` assert` and `` `assert` ``
differently; measured: with a bare `[source: assert]` a 1M-parameter model learned the format but
cited the right topic for <10% of held-out questions).

Each topic is asked in the four QUESTIONS phrasings and in two of MID_QUESTIONS, which name the
topic before a few more words. A few conversations have two question/answer turns. The held-out
questions use phrasings the SFT data never shows (HELDOUT_QUESTIONS), about every topic, so they
measure whether the model answers new questions in the house format and cites the right section.

Out-of-scope questions ask the same way about topics the reference does not contain
(OUT_OF_SCOPE_TOPICS: cooking, geography, music, ...); the house rule is to answer them with the
fixed REFUSAL sentence. The SFT data shows that sentence for a few such topics only
(`demo_data.sft_refusal_topics`), so the SFT model knows it but not the rule; the DPO stage's prompts
(dpo_prompts.jsonl: the training phrasings of every topic, with the topic id to cite as
`source`, plus out-of-scope questions without one) teach the rule through a rubric judge, and
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
# the DPO prompts add phrasings of their own (none of them held out), so that the topic, not the
# wording, is what tells an in-scope question from an out-of-scope one
DPO_QUESTIONS = QUESTIONS + ("Describe `{name}`.", "Give me the reference entry for `{name}`.",
                             "I need to know about `{name}`.", "Can you explain `{name}` briefly?",
                             "Explain `{name}` in one line.", "Tell me about `{name}` in a few words.",
                             "Define `{name}`.", "What do we know about `{name}`?")
MAX_WORDS = 14
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


def out_of_scope_split(heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(training, held-out) out-of-scope topics: the held-out ones never appear in any training data."""
    heldout = [t for t in OUT_OF_SCOPE_TOPICS if is_heldout(f"oos:{t}", max(heldout_fraction, 0.4), seed)]
    return [t for t in OUT_OF_SCOPE_TOPICS if t not in heldout], heldout


def build_demo_sft(out_dir: str | os.PathLike, heldout_fraction: float, seed: int, refusal_topics: int = 6,
                   rs_seeds: int = 32, rs_heldout_seeds: int = 12, turns: int = 6) -> dict:
    """Write sft_train.jsonl (conversations), dpo_prompts.jsonl ({"prompt"[, "source"]}),
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
        other_topic, other_sentence = pairs[(i * 7 + 3) % len(pairs)]
        conversations.append({"messages": [  # multi-turn: two topics in one conversation
            {"role": "system", "content": DIALOGUE_RULE},
            {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)].format(name=topic_name(topic))},
            {"role": "assistant", "content": house_answer(sentence, topic)},
            {"role": "user", "content": QUESTIONS[(i + 1) % len(QUESTIONS)].format(name=topic_name(other_topic))},
            {"role": "assistant", "content": house_answer(other_sentence, other_topic)}]})
    oos_train, oos_heldout = out_of_scope_split(heldout_fraction, seed)
    for i, topic in enumerate(oos_train[:refusal_topics]):
        conversations.append({"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)].format(name=topic)},
                                           {"role": "assistant", "content": REFUSAL}]})
    out = Path(out_dir)
    _write_jsonl(out / "sft_train.jsonl", conversations)
    dpo_prompts = [{"prompt": template.format(name=topic_name(t)), "source": t} for t, _ in pairs
                   for template in DPO_QUESTIONS]
    dpo_prompts += [{"prompt": template.format(name=t)} for t in oos_train for template in DPO_QUESTIONS]
    _write_jsonl(out / "dpo_prompts.jsonl", dpo_prompts)
    heldout = [{"prompt": template.format(name=topic_name(t)), "source": t, "answer": sentence}
               for t, sentence in pairs for template in HELDOUT_QUESTIONS]
    heldout = [q for q in heldout if is_heldout(q["prompt"], heldout_fraction, seed)]
    heldout += [{"prompt": template.format(name=t), "source": None} for t in oos_heldout
                for template in HELDOUT_QUESTIONS]
    _write_jsonl(out / "sft_heldout.jsonl", heldout)
    seeds, heldout_seeds = dialogue_seeds([t for t, _ in pairs], rs_seeds, rs_heldout_seeds, turns)
    _write_jsonl(out / "rs_seeds.jsonl", seeds)
    _write_jsonl(out / "rs_heldout_seeds.jsonl", heldout_seeds)
    return {"sft_train": len(conversations), "sft_heldout": len(heldout), "topics": len(pairs),
            "dpo_prompts": len(dpo_prompts), "out_of_scope_heldout": len(oos_heldout), "rs_seeds": len(seeds),
            "rs_heldout_seeds": len(heldout_seeds)}


def dialogue_seeds(topics: list[str], count: int, heldout_count: int, turns: int) -> tuple[list[dict], list[dict]]:
    """rs_sft seeds (training) and held-out seeds for the multi-turn eval: the house rule is
    stated in turn 1 (system prompt and constraints), the opening asks about one topic and each
    follow-up about another, with the topic to cite as that turn's `source`. Held-out seeds use
    other topic sequences and the held-out phrasings."""
    def seed(i: int, phrasings: tuple[str, ...], offset: int) -> dict:
        chosen = [topics[(offset + i * 11 + k * 7) % len(topics)] for k in range(turns)]
        return {"id": f"{'h' if offset else 's'}{i}", "system": DIALOGUE_RULE,
                "user": phrasings[i % len(phrasings)].format(name=chosen[0]), "source": chosen[0],
                "constraints": ["answer in one sentence", "cite the reference topic of every answer"], "turns": turns,
                "follow_ups": [{"content": phrasings[(i + k) % len(phrasings)].format(name=t), "source": t}
                               for k, t in enumerate(chosen[1:], 1)]}
    return ([seed(i, QUESTIONS, 0) for i in range(count)],
            [seed(i, HELDOUT_QUESTIONS, len(topics) // 2 + 1) for i in range(heldout_count)])


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
