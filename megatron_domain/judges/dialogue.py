"""Whole-dialogue scores for rs_sft, on a 0-100 scale.

- A rubric judge scores every assistant turn against the fields in force at that turn (the
  seed's, updated by its follow-ups), with the messages before it as the prompt. The
  dialogue's score is the mean turn score x 100. Rules marked `constraint: true` are the
  constraints stated in turn 1: their pass rate at turn k is the dialogue's *retention* at k.
- Any other judge (pairwise, panel, an endpoint) scores the whole transcript ("User: ...",
  "Assistant: ..." lines) against the seed, all dialogues of a seed together; no per-turn
  retention then.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_domain.data.seeds import Seed
from megatron_domain.judges import Judge, JudgeError, score_all
from megatron_domain.judges.rubric import RubricJudge
from megatron_domain.rollout.dialogues import Dialogue
from megatron_domain.rollout.prompts import PromptRecord


@dataclass
class DialogueScore:
    """A dialogue's score (0-100), its per-turn scores (0-1) and constraint retention (0-1,
    None where no constraint rule applies), and the judge's reasons."""

    score: float
    turn_scores: list[float] = field(default_factory=list)
    retention: list[float | None] = field(default_factory=list)
    rationale: str = ""
    rule_values: list[dict] = field(default_factory=list)  # per turn: {rule name: value} (rubric)


def transcript(dialogue: Dialogue) -> str:
    """The generated part of a dialogue as text a judge reads (opening user turns included)."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in dialogue.messages if m["role"] != "system"]
    return "\n".join(lines)


def rubric_dialogue_score(judge: RubricJudge, dialogue: Dialogue, where: str = "") -> DialogueScore:
    """Turn-by-turn rubric score of one dialogue (see the module docstring); `where` names
    its seed's line in errors."""
    turn_scores, retention, notes, rule_values = [], [], [], []
    for turn, (answer, fields) in enumerate(zip(dialogue.answers, dialogue.turn_fields), 1):
        prompt = PromptRecord(f"{dialogue.seed_id}#{dialogue.index} turn {turn}", messages=dialogue.history(turn),
                              fields=fields)
        try:
            verdicts = judge.verdicts(prompt, answer)
        except JudgeError:
            raise
        except Exception as exc:  # a rule function of the user's: say where it failed
            raise JudgeError(f"{judge.name} failed on turn {turn} of dialogue {dialogue.index} of seed "
                             f"{dialogue.seed_id!r} ({where}): {type(exc).__name__}: {exc}") from exc
        if any(value is None for _, value, _ in verdicts):
            rule = next(rule for rule, value, _ in verdicts if value is None)
            raise JudgeError(f"{judge.name}: rule {rule.name or rule.pattern or rule.function!r} gave no score for "
                             f"turn {turn} of dialogue {dialogue.index} of seed {dialogue.seed_id!r} ({where})")
        weight = sum(rule.weight for rule, _, _ in verdicts)
        turn_scores.append(sum(rule.weight * value for rule, value, _ in verdicts) / weight if weight else 0.0)
        rule_values.append({rule.name or rule.pattern or rule.function: value for rule, value, _ in verdicts})
        constraint = [value for rule, value, _ in verdicts if rule.constraint]
        retention.append(sum(constraint) / len(constraint) if constraint else None)
        failed = [rule.name or rule.pattern for rule, value, _ in verdicts if value < 1]
        notes.append(f"t{turn}: " + ("ok" if not failed else "missed " + ", ".join(failed)))
    score = 100.0 * sum(turn_scores) / len(turn_scores) if turn_scores else 0.0
    return DialogueScore(score, turn_scores, retention, "; ".join(notes), rule_values)


def score_dialogues(judge: Judge, seeds: list[Seed], dialogues: list[list[Dialogue]]) -> list[list[DialogueScore]]:
    """Scores of every dialogue, grouped like `dialogues` (one group per seed)."""
    if isinstance(judge, RubricJudge):
        return [[rubric_dialogue_score(judge, d, seed.where) for d in group] for seed, group in zip(seeds, dialogues)]
    records = [PromptRecord(f"{seed.id} ({seed.where})", messages=seed.opening,
                            fields={**seed.fields, "constraints": seed.constraints}) for seed in seeds]
    results = score_all(judge, records, [[transcript(d) for d in group] for group in dialogues])
    return [[DialogueScore(100.0 * float(s), rationale=r) for s, r in zip(result.scores, result.rationales)]
            for result in results]
