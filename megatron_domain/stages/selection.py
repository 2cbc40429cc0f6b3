"""Which sampled dialogues rs_sft trains on, and whether the kept set has collapsed.

Selection keeps the best `keep_fraction` of each seed's dialogues (floor, at least one:
8 dialogues x 0.25 = the best 2) or of all dialogues (`keep_per: global`), then drops those
under `min_score`, then near-duplicates within a seed (a later, lower-scored dialogue whose
assistant words overlap a kept one's by `dedup_similarity` or more, Jaccard on word sets).
Ties keep the earlier dialogue.

Diversity is measured on the assistant turns: distinct-2 (unique word bigrams / all bigrams),
the share of the most common opening sentence, and self-similarity (mean pairwise Jaccard of
the word sets of one seed's dialogues, averaged over seeds with two or more).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations

from megatron_domain.config import CollapseGuardConfig

WORD = re.compile(r"\w+|[^\w\s]")
SENTENCE_END = re.compile(r"(?<=[.!?])\s")


@dataclass
class Selection:
    """Kept (seed index, dialogue index) pairs in score order, and what was dropped why."""

    kept: list[tuple[int, int]] = field(default_factory=list)
    below_min_score: int = 0
    deduplicated: int = 0
    not_top: int = 0


def words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens."""
    return WORD.findall(text.lower())


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b| (1 for two empty sets)."""
    return len(a & b) / len(a | b) if a or b else 1.0


def select(scores: list[list[float]], answers: list[list[list[str]]], keep_fraction: float, keep_per: str,
           min_score: float, dedup_similarity: float) -> Selection:
    """`scores[s][d]` of dialogue d of seed s (0-100), `answers[s][d]` its assistant turns."""
    out = Selection()
    ranked = lambda items: sorted(items, key=lambda sd: (-scores[sd[0]][sd[1]], sd))  # noqa: E731
    if keep_per == "seed":
        candidates = []
        for s, group in enumerate(scores):
            take = max(1, math.floor(keep_fraction * len(group) + 1e-9))
            candidates += ranked([(s, d) for d in range(len(group))])[:take]
            out.not_top += len(group) - take
    else:
        everything = [(s, d) for s, group in enumerate(scores) for d in range(len(group))]
        take = max(1, math.floor(keep_fraction * len(everything) + 1e-9))
        candidates = ranked(everything)[:take]
        out.not_top = len(everything) - take
    kept_words: dict[int, list[set]] = {}
    for s, d in ranked(candidates):
        if scores[s][d] < min_score:
            out.below_min_score += 1
            continue
        vocabulary = set(words(" ".join(answers[s][d])))
        if any(jaccard(vocabulary, other) >= dedup_similarity for other in kept_words.get(s, [])):
            out.deduplicated += 1
            continue
        kept_words.setdefault(s, []).append(vocabulary)
        out.kept.append((s, d))
    return out


def opening_sentence(text: str) -> str:
    """The first sentence of an answer, whitespace-normalized and lower-cased."""
    return " ".join(SENTENCE_END.split(text.strip(), maxsplit=1)[0].lower().split())


def diversity(dialogues: list[list[list[str]]]) -> dict:
    """Diversity of a set of dialogues given per seed as lists of assistant turns."""
    bigrams: list[tuple[str, str]] = []
    openings: list[str] = []
    similarities = []
    for group in dialogues:
        for answers in group:
            for answer in answers:
                tokens = words(answer)
                bigrams += list(zip(tokens, tokens[1:]))
                openings.append(opening_sentence(answer))
        if len(group) >= 2:
            vocabularies = [set(words(" ".join(answers))) for answers in group]
            pairs = [jaccard(a, b) for a, b in combinations(vocabularies, 2)]
            similarities.append(sum(pairs) / len(pairs))
    top = Counter(openings).most_common(1)
    return {"dialogues": sum(len(group) for group in dialogues), "answers": len(openings),
            "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
            "top_opening": top[0][0] if top else "", "top_opening_share": top[0][1] / len(openings) if top else 0.0,
            "self_similarity": sum(similarities) / len(similarities) if similarities else 0.0}


def collapse_problems(kept: dict, guard: CollapseGuardConfig) -> list[str]:
    """The collapse thresholds the kept set's diversity crosses, as messages."""
    problems = []
    if kept["distinct_2"] < guard.min_distinct_2:
        problems.append(f"distinct-2 of the kept answers is {kept['distinct_2']:.3f} < rs_sft.collapse.min_distinct_2 "
                        f"({guard.min_distinct_2})")
    if kept["top_opening_share"] > guard.max_top_opening_share:
        problems.append(f"{kept['top_opening_share']:.1%} of the kept answers open with {kept['top_opening']!r} > "
                        f"rs_sft.collapse.max_top_opening_share ({guard.max_top_opening_share:.0%})")
    if kept["self_similarity"] > guard.max_self_similarity:
        problems.append(f"the kept dialogues of a seed overlap by {kept['self_similarity']:.3f} on average > "
                        f"rs_sft.collapse.max_self_similarity ({guard.max_self_similarity})")
    return problems
