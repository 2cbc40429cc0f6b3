"""Domain metrics of generated answers to held-out questions, scored against the question's
references (the generation eval's record format, README "Domain metrics"):

    {"prompt": str, "source": str | null, "sources": [str]?, "answer": str | [str]?}

- QA accuracy (questions with `answer`): `qa_exact_match` (the answer, citations removed and
  stripped, equals a reference), `qa_normalized_match` (equal after `normalize_answer`:
  lower case, no punctuation, no articles, single spaces, as SQuAD's evaluation script) and
  `qa_f1` (SQuAD token F1 against the best reference);
- citations (answerable questions): every `[source: a]` or `[source: a, b]` in the answer is a
  cited source; the gold sources are `sources`, else `[source]`. `citation_precision` = cited and
  gold / cited, `citation_recall` = cited and gold / gold, both summed over the questions
  (micro-averaged) so an answer citing nothing counts against recall only;
- refusal calibration: `over_refusal` = share of answerable questions (a source) refused,
  `under_refusal` = share of unanswerable ones (null source, no sources) answered; a refusal
  is the configured refusal sentence or an answer matching one of `refusal_patterns`.

We write these scorers instead of using lm-eval's `exact_match` metric because the answer
format carries a citation that must be split from the answer text first, and the citation and
refusal metrics need the question's gold sources, which lm-eval's per-document metrics do not
see together with the other questions' (micro averages).
"""

from __future__ import annotations

import collections
import re
import string

CITATION_GROUP = re.compile(r"\[source:\s*(?P<sources>[^\]]*)\]")
ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, articles (a, an, the) removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalized tokens of `prediction` against `reference` (1.0 when both empty)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def cited_sources(answer: str) -> list[str]:
    """The distinct sources an answer cites, in order: `[source: a]`, `` [source: `a`] `` and
    `[source: a, b]` (comma-separated ids in one bracket) are all read."""
    cited: list[str] = []
    for group in CITATION_GROUP.finditer(answer):
        for source in group.group("sources").split(","):
            source = source.strip().strip("`").strip()
            if source and source not in cited:
                cited.append(source)
    return cited


def answer_text(answer: str) -> str:
    """The answer without its citations, stripped."""
    return CITATION_GROUP.sub("", answer).strip()


def gold_sources(question: dict) -> list[str]:
    """A question's gold sources: `sources` when given, else `[source]` (empty: unanswerable)."""
    if question.get("sources"):
        return [str(s) for s in question["sources"]]
    return [str(question["source"])] if question.get("source") else []


def references(question: dict) -> list[str]:
    """A question's reference answers (`answer`: one string or a list; empty when absent)."""
    answer = question.get("answer")
    if answer is None:
        return []
    return [answer] if isinstance(answer, str) else [str(a) for a in answer]


def is_refusal(answer: str, refusal: str, patterns: list[re.Pattern]) -> bool:
    """The answer is the refusal sentence, or matches one of the refusal patterns."""
    answer = answer.strip()
    return (bool(refusal) and answer == refusal.strip()) or any(p.search(answer) for p in patterns)


def domain_metrics(questions: list[dict], answers: list[str], refusal: str = "",
                   refusal_patterns: list[str] | tuple[str, ...] = ()) -> dict:
    """The metrics of the module docstring over parallel lists of questions and answers; a
    metric whose questions are absent (no reference answers, no unanswerable questions, no
    refusal rule) is left out rather than reported as 0."""
    patterns = [re.compile(p) for p in refusal_patterns]
    result: dict = {}
    qa = [(answer_text(a), refs) for q, a in zip(questions, answers) if (refs := references(q))]
    if qa:
        result["qa_exact_match"] = sum(any(text == r.strip() for r in refs) for text, refs in qa) / len(qa)
        result["qa_normalized_match"] = sum(any(normalize_answer(text) == normalize_answer(r) for r in refs)
                                            for text, refs in qa) / len(qa)
        result["qa_f1"] = sum(max(token_f1(text, r) for r in refs) for text, refs in qa) / len(qa)
    answerable = [(set(cited_sources(a)), set(gold_sources(q)), a) for q, a in zip(questions, answers)
                  if gold_sources(q)]
    if answerable:
        hits = sum(len(cited & gold) for cited, gold, _ in answerable)
        cited_total = sum(len(cited) for cited, _, _ in answerable)
        result["citation_precision"] = hits / cited_total if cited_total else 0.0
        result["citation_recall"] = hits / sum(len(gold) for _, gold, _ in answerable)
    if refusal or patterns:
        unanswerable = [a for q, a in zip(questions, answers) if not gold_sources(q)]
        if answerable:
            result["over_refusal"] = sum(is_refusal(a, refusal, patterns) for _, _, a in answerable) / len(answerable)
        if unanswerable:
            result["under_refusal"] = sum(not is_refusal(a, refusal, patterns) for a in unanswerable) / len(unanswerable)
    return result
