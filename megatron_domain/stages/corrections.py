"""Gold corrections of kept rs_sft dialogues (`rs_sft.gold_field`), as STaR's
"rationalization": where the policy failed a turn whose seed knows the right answer, the kept
dialogue trains on that answer instead of leaving the turn out.

A seed names a turn's known-good answer under the key `rs_sft.gold_field` in the fields set *at
that turn*: the seed's own fields for turn 1, the follow-up's for later turns (unlike the other
fields, a gold answer does not carry over to later turns: it answers one question). For every
kept dialogue, each generated turn the judge did not pass in full and that has a gold answer is
replaced by it; the corrected dialogue is judged again, and a gold answer that does not pass the
rubric in full itself is put back (counted as rejected: the seed file and the rubric disagree).
The later turns keep what the policy answered; their history now holds the corrected turn.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_domain.data.chat import ChatDataError
from megatron_domain.data.seeds import Seed, follow_up
from megatron_domain.judges.dialogue import rubric_dialogue_score
from megatron_domain.judges.rubric import RubricJudge
from megatron_domain.rollout.dialogues import Dialogue


@dataclass
class CorrectionCounts:
    """Turns of the kept dialogues: replaced by their gold answer, gold answers the rubric
    failed (put back), and failed turns without a gold answer."""

    gold_turns: int = 0
    gold_rejected: int = 0
    failed_without_gold: int = 0

    def add(self, other: "CorrectionCounts") -> None:
        """Add another dialogue's counts to these."""
        self.gold_turns += other.gold_turns
        self.gold_rejected += other.gold_rejected
        self.failed_without_gold += other.failed_without_gold


def gold_answer(seed: Seed, turn: int, key: str, scripted: list[str]) -> str | None:
    """The known-good answer of assistant turn `turn` (1-based): `key` of the fields set at that
    turn (the seed's for turn 1, its follow-up's after), None where there is none. An empty or
    non-string value is an error naming the seed's line."""
    if turn == 1:
        value = seed.fields.get(key)
    else:
        item = follow_up(seed, turn, scripted)
        value = None if item is None else item.fields.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ChatDataError(f"{seed.where}: seed {seed.id!r}: {key!r} (rs_sft.gold_field) of turn {turn} must be a "
                            f"non-empty answer or null, got {value!r}")
    return value


def check_gold_field(seeds: list[Seed], key: str, scripted: list[str], path: str) -> None:
    """Fail before any generation when no turn of any seed carries `key` (a misspelt
    rs_sft.gold_field), or when one carries an empty value."""
    found = False
    for seed in seeds:
        for turn in range(1, seed.turns + 1):
            found = gold_answer(seed, turn, key, scripted) is not None or found
    if not found:
        raise ValueError(f"rs_sft.gold_field: no seed of {path} has the key {key!r}, at the top level (turn 1) or "
                         "in a follow-up; add it where a turn has a known-good answer, or unset rs_sft.gold_field")


def correct_with_gold(line: dict, dialogue: Dialogue, seed: Seed, key: str, scripted: list[str],
                      judge: RubricJudge) -> tuple[dict, CorrectionCounts]:
    """A kept dialogues.jsonl `line` (its `dialogue`) with failed turns replaced by their gold
    answers where those pass the rubric: the line gets corrected `messages` and `gold_turns`
    (1-based generated turns now holding gold answers); the original is not changed."""
    counts = CorrectionCounts()
    golds = {}
    for turn, score in enumerate(line["turn_scores"], 1):
        if score >= 1.0:
            continue
        gold = gold_answer(seed, turn, key, scripted)
        if gold is None:
            counts.failed_without_gold += 1
        else:
            golds[turn] = gold
    if not golds:
        return {**line, "gold_turns": []}, counts
    positions = [i for i in range(dialogue.opening, len(dialogue.messages))
                 if dialogue.messages[i]["role"] == "assistant"]  # message index of each generated turn
    messages = [dict(m) for m in dialogue.messages]
    for turn, gold in golds.items():
        messages[positions[turn - 1]]["content"] = gold
    rescored = rubric_dialogue_score(judge, dataclasses.replace(dialogue, messages=messages), seed.where)
    accepted = []
    for turn in golds:
        if rescored.turn_scores[turn - 1] >= 1.0:
            accepted.append(turn)
        else:  # the gold answer fails the rubric: keep what the policy said
            messages[positions[turn - 1]]["content"] = dialogue.messages[positions[turn - 1]]["content"]
            counts.gold_rejected += 1
    counts.gold_turns = len(accepted)
    return {**line, "messages": messages, "gold_turns": sorted(accepted)}, counts
