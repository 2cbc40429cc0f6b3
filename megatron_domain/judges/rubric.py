"""The rubric judge: rules in config or code. An answer's score is the weighted share of the
applicable rules it passes (in [0, 1]); its rationale lists every rule's verdict.

    judge:
      kind: rubric
      rules:
        - {name: format, pattern: "^[^\\n]+[.!?] \\[source: `[^`]+`\\]$"}
        - {name: citation, pattern: "\\[source: `{source}`\\]", when: source}
        - {name: refusal, function: "mypkg.rules:refuses_out_of_scope"}

A pattern is searched in the stripped answer; `{field}` is replaced by the prompt's field,
regex-escaped. A function `module:function` is called as f(prompt_fields, answer) with the
prompt's fields plus `messages`, and returns a score in [0, 1] or (score, reason).
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

from megatron_domain.config import RubricRuleConfig
from megatron_domain.judges import JudgeError, JudgeResult
from megatron_domain.rollout.prompts import PromptRecord

PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)\}")  # {field}; {2}, {2,5} stay regex quantifiers


def load_function(spec: str, where: str) -> Callable:
    """`module:function` -> the callable (errors name `where` and the spec)."""
    module_name, _, attr = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise JudgeError(f"{where}: cannot load {spec!r} ({exc}); give an importable module:function") from exc
    if not callable(function):
        raise JudgeError(f"{where}: {spec!r} is not callable")
    return function


def applies(rule: RubricRuleConfig, fields: dict) -> bool:
    """Whether `rule.when` selects this prompt (`field`: truthy; `!field`: missing or falsy)."""
    if not rule.when:
        return True
    if rule.when.startswith("!"):
        return not fields.get(rule.when[1:])
    return bool(fields.get(rule.when))


class RubricJudge:
    """Rules -> weighted pass rate per answer."""

    max_concurrency = 1

    def __init__(self, rules: list[RubricRuleConfig], name: str = "judge"):
        self.name = name
        self.rules = rules
        self.functions = {i: load_function(r.function, f"{name}.rules[{i}].function")
                          for i, r in enumerate(rules) if r.function}

    def _pattern(self, rule: RubricRuleConfig, index: int, prompt: PromptRecord, fields: dict) -> re.Pattern:
        def fill(match: re.Match) -> str:
            key = match.group(1)
            if key not in fields:
                raise JudgeError(f"{self.name}.rules[{index}] ({rule.name or rule.pattern}) needs the field {key!r}, "
                                 f"which prompt {prompt.id!r} does not have; add it to the prompt's line or gate the "
                                 f"rule with when: {key}")
            return re.escape(str(fields[key]))
        return re.compile(PLACEHOLDER.sub(fill, rule.pattern), re.S)

    def _check(self, index: int, rule: RubricRuleConfig, prompt: PromptRecord, fields: dict,
               answer: str) -> tuple[float | None, str]:
        if rule.function:
            out = self.functions[index]({**fields, "messages": prompt.messages}, answer)
            score, reason = out if isinstance(out, tuple) else (out, "")
            return (None if score is None else float(score)), reason
        found = self._pattern(rule, index, prompt, fields).search(answer.strip()) is not None
        return float(found == rule.must_match), ""

    def verdicts(self, prompt: PromptRecord, answer: str) -> list[tuple[RubricRuleConfig, float | None, str]]:
        """(rule, value in [0, 1] or None when it could not score, reason) for every rule that
        applies to `prompt`, in order; stops after the first None."""
        fields = prompt.fields or {}
        out = []
        for i, rule in enumerate(self.rules):
            if applies(rule, fields):
                value, reason = self._check(i, rule, prompt, fields, answer)
                out.append((rule, value, reason))
                if value is None:
                    break
        return out

    def score(self, prompt: PromptRecord, completions: list[str]) -> JudgeResult:
        """Weighted share of passed rules per completion, with each rule's verdict as rationale."""
        scores, rationales = [], []
        for answer in completions:
            verdicts = self.verdicts(prompt, answer)
            notes = [f"{rule.name or self.rules.index(rule)}: " + ("no score" if value is None else f"{value:g}")
                     + (f" ({reason})" if reason else "") for rule, value, reason in verdicts]
            total_weight = sum(rule.weight for rule, _, _ in verdicts)
            if any(value is None for _, value, _ in verdicts):
                scores.append(None)
            else:
                earned = sum(rule.weight * value for rule, value, _ in verdicts)
                scores.append(earned / total_weight if total_weight else 0.0)
            rationales.append("; ".join(notes) or "no rule applies")
        return JudgeResult(scores, rationales)
