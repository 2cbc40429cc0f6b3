"""The multi-turn eval (`eval.dialogues`): one greedy dialogue per held-out seed, scored turn
by turn by the rubric. Shares in [0, 1] (the dialogue score / 100), so the pipeline's checks
read gains in points as for the other generation metrics:

- `dialogue_score`: mean dialogue score / 100;
- `retention_by_turn`: constraint retention at each turn index (mean over dialogues reaching it);
- `late_retention`: retention over turns >= late_turn; `late_rules`: the pass rate there of each
  rule that applied there (a rule with `when` may not);
- `samples`: the first dialogue's turns.
"""

from __future__ import annotations

import torch

from megatron_domain.config import DialogueEvalConfig
from megatron_domain.data.chat import load_template
from megatron_domain.data.seeds import read_seeds
from megatron_domain.data.tokenizer import TextTokenizer
from megatron_domain.judges import build_judge
from megatron_domain.judges.dialogue import score_dialogues
from megatron_domain.rollout.dialogues import generate_dialogues
from megatron_domain.rollout.native import NativeSampler
from megatron_domain.rollout.prompts import stop_conditions
from megatron_domain.rollout.sampling import SamplingParams


def mean(values: list[float]) -> float:
    """Mean of a list (nan when empty)."""
    return sum(values) / len(values) if values else float("nan")


@torch.no_grad()
def evaluate_dialogues(model: torch.nn.Module, tokenizer: TextTokenizer, cfg: DialogueEvalConfig,
                       device: torch.device, max_seq_len: int) -> dict:
    """Greedy dialogues of every held-out seed, scored (see the module docstring)."""
    seeds = read_seeds(cfg.seeds, cfg.turns)
    template = load_template(cfg.template, tokenizer.source)
    stop_ids, stop_strings = stop_conditions(template, tokenizer)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, stop_token_ids=stop_ids,
                            stop=stop_strings)
    sampler = NativeSampler.for_tokenizer(model, tokenizer, device)
    was_training = model.training
    model.eval()
    try:
        dialogues = generate_dialogues(lambda prompts, p, s, progress: sampler.generate(prompts, p, s), seeds, 1,
                                       cfg.follow_ups, template, tokenizer, params,
                                       max_seq_len - cfg.max_new_tokens, base_seed=0)
    finally:
        model.train(was_training)
    scores = [group[0] for group in score_dialogues(build_judge(cfg.judge, device, "eval.dialogues.judge"), seeds,
                                                    dialogues)]
    turns = max(len(s.retention) for s in scores)
    by_turn = [[s.retention[t] for s in scores if t < len(s.retention) and s.retention[t] is not None]
               for t in range(turns)]
    late = [v for s in scores for t, v in enumerate(s.retention, 1) if t >= cfg.late_turn and v is not None]
    rules = sorted({name for s in scores for t, values in enumerate(s.rule_values, 1) if t >= cfg.late_turn
                    for name in values})  # the rules that applied on a late turn
    late_rules = {name: mean([values[name] for s in scores for t, values in enumerate(s.rule_values, 1)
                              if t >= cfg.late_turn and name in values]) for name in rules}
    first = dialogues[0][0]
    return {"dialogue_score": mean([s.score for s in scores]) / 100.0,
            "retention_by_turn": [mean(values) for values in by_turn],
            "late_retention": mean(late), "late_rules": late_rules,
            "late_turns": sum(max(0, len(s.turn_scores) - cfg.late_turn + 1) for s in scores),
            "dialogues": len(scores), "mean_turns": mean([len(s.turn_scores) for s in scores]),
            "samples": [{"messages": first.messages[first.opening - 1:], "score": scores[0].score,
                         "rationale": scores[0].rationale}]}
