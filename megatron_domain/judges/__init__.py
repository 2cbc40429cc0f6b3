"""Judges score the completions of a prompt, one interface for online DPO and RS-SFT:

    judge.score(prompt, completions) -> JudgeResult(scores, rationales, stats)

`prompt` is a rollout.prompts.PromptRecord (its chat messages plus the other fields of its
line, e.g. the known `source` a citation must name); `completions` are the answers' texts.
Higher scores are better; a score of None is an error (the caller names the prompt).

Kinds (`judge.kind`): `rubric` (rules in config or code, judges/rubric.py), `pairwise` (a
stronger model compares two answers in both orders, judges/pairwise.py), `panel` (several
judges vote, judges/panel.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from megatron_domain.config import JudgeConfig
from megatron_domain.rollout.prompts import PromptRecord


class JudgeError(RuntimeError):
    """A judge could not score: names the judge, the prompt or the endpoint, and what to do."""


@dataclass
class JudgeResult:
    """Scores (one per completion, higher is better) with a rationale each; `stats`: counters
    the judge reports (e.g. comparisons, position-bias counts, panel agreement)."""

    scores: list[float | None]
    rationales: list[str]
    stats: dict = field(default_factory=dict)


class Judge(Protocol):
    """What every judge implements. `max_concurrency` > 1: prompts may be scored in parallel threads."""

    name: str
    max_concurrency: int

    def score(self, prompt: PromptRecord, completions: list[str]) -> JudgeResult: ...


def build_judge(cfg: JudgeConfig, device: torch.device | str = "cpu", name: str = "judge") -> Judge:
    """The judge `cfg` describes (models load on `device`)."""
    if cfg.kind == "rubric":
        from megatron_domain.judges.rubric import RubricJudge

        return RubricJudge(cfg.rules, name)
    if cfg.kind == "pairwise":
        from megatron_domain.judges.pairwise import PairwiseJudge, verdict_backend

        return PairwiseJudge(verdict_backend(cfg, device), name, cfg.max_concurrency)
    if cfg.kind == "panel":
        from megatron_domain.config import judge_from_dict
        from megatron_domain.judges.panel import PanelJudge

        members = [build_judge(judge_from_dict(m, f"{name}.members[{i}]"), device, m.get("name") or f"member{i}")
                   for i, m in enumerate(cfg.members)]
        return PanelJudge(members, cfg.vote, name)
    raise JudgeError(f"{name}.kind: unknown {cfg.kind!r}")


def score_all(judge: Judge, prompts: list[PromptRecord], completions: list[list[str]]) -> list[JudgeResult]:
    """Every prompt's completions scored (in parallel threads up to the judge's
    max_concurrency); a missing score raises JudgeError naming the prompt."""
    def one(i: int) -> JudgeResult:
        result = judge.score(prompts[i], completions[i])
        missing = [j for j, s in enumerate(result.scores) if s is None]
        if missing or len(result.scores) != len(completions[i]):
            raise JudgeError(f"{judge.name} returned no score for completion(s) {missing or 'all'} of prompt "
                             f"{prompts[i].id!r}; a judge must score every completion "
                             f"(rationale: {result.rationales[missing[0]] if missing else '-'})")
        return result

    if judge.max_concurrency <= 1 or len(prompts) <= 1:
        return [one(i) for i in range(len(prompts))]
    with ThreadPoolExecutor(max_workers=min(judge.max_concurrency, len(prompts))) as pool:
        return list(pool.map(one, range(len(prompts))))


def merge_stats(results: list[JudgeResult]) -> dict:
    """Sum of every numeric stat over results (the round's totals)."""
    total: dict = {}
    for result in results:
        for key, value in result.stats.items():
            total[key] = total.get(key, 0) + value
    return total
