"""The panel judge: several judges score the same completions; `mean` averages their scores,
`majority` gives each member one vote for its best completion (score = share of votes).
Agreement (all members pick the same best completion) is reported per prompt."""

from __future__ import annotations

from megatron_domain.judges import Judge, JudgeResult
from megatron_domain.rollout.prompts import PromptRecord


def best(scores: list[float]) -> int | None:
    """Index of the single highest score (None on a tie for first)."""
    top = max(scores)
    winners = [i for i, s in enumerate(scores) if s == top]
    return winners[0] if len(winners) == 1 else None


class PanelJudge:
    """Members vote by `mean` or `majority`."""

    def __init__(self, members: list[Judge], vote: str = "mean", name: str = "judge"):
        self.members, self.vote, self.name = members, vote, name
        self.max_concurrency = min(m.max_concurrency for m in members)

    def score(self, prompt: PromptRecord, completions: list[str]) -> JudgeResult:
        """Every member's result combined; rationale: each member's score and reason."""
        results = [m.score(prompt, completions) for m in self.members]
        if any(s is None for r in results for s in r.scores):
            return JudgeResult([None] * len(completions),
                               [f"{m.name} gave no score" for m in self.members][:len(completions)])
        picks = [best(r.scores) for r in results]
        if self.vote == "mean":
            scores = [sum(r.scores[i] for r in results) / len(results) for i in range(len(completions))]
        else:
            scores = [sum(p == i for p in picks) / len(results) for i in range(len(completions))]
        rationales = [" | ".join(f"{m.name}: {r.scores[i]:.3g} ({r.rationales[i]})"
                                 for m, r in zip(self.members, results)) for i in range(len(completions))]
        stats = {"panel_prompts": 1, "panel_agreement": int(picks[0] is not None and len(set(picks)) == 1)}
        for r in results:
            for key, value in r.stats.items():
                stats[key] = stats.get(key, 0) + value
        return JudgeResult(scores, rationales, stats)
