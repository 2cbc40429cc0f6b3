"""Rubric checks on generated answers (greedy decoding with the native sampler): the house
rules of the SFT and DPO stages, on held-out questions ({"prompt", "source"}; a null source
marks a question the reference does not cover; optional "sources" and "answer" references feed
the domain metrics of eval/domain_metrics.py, which are reported beside these).

- format_adherence: share of in-scope answers that are exactly one line, a sentence ending in
  `.`, `!` or `?`, then `` [source: `<topic id>`]`` and nothing else;
- citation_accuracy: share of in-scope answers whose cited topic id is the question's source;
- refusal_in_scope / refusal_out_of_scope: share of in-scope (should be 0) and out-of-scope
  (should be 1) answers that are the refusal sentence (`eval.generation.refusal`);
- kl_to_reference (`eval.generation.kl_samples` > 0, and a reference model given): the mean
  over held-out prompts of log pi(y) - log pi_ref(y) for y sampled from the policy at
  temperature 1, i.e. a Monte-Carlo estimate of KL(pi || pi_ref) per answer.
"""

from __future__ import annotations

import re

import torch

from megatron_domain.data.chat import jsonl_records, load_template
from megatron_domain.data.tokenizer import TextTokenizer
from megatron_domain.eval.domain_metrics import domain_metrics, gold_sources, is_refusal
from megatron_domain.rollout.native import NativeSampler
from megatron_domain.rollout.prompts import chat_prompt_ids, stop_conditions
from megatron_domain.rollout.sampling import SamplingParams

HOUSE_FORMAT = re.compile(r"^[^\n\[\]]{8,}[.!?] \[source: `(?P<source>[a-z0-9_-]+)`\]$")
CITATION = re.compile(r"\[source: `?(?P<source>[^\]`]+)`?\]")


def read_questions(path: str) -> list[dict]:
    """{"prompt", "source" or "sources"[, "answer"]} records of a JSONL file (errors name file and line)."""
    questions = []
    for where, record in jsonl_records(path, "a question (eval.generation.path)"):
        if not isinstance(record, dict) or "prompt" not in record or not ("source" in record or "sources" in record):
            raise ValueError(f"{where}: expected {{\"prompt\": ..., \"source\": ...}} (or \"sources\": [...]; "
                             "optional \"answer\": a reference string or a list of them)")
        if not isinstance(record.get("sources", []), list) or not isinstance(record.get("answer", ""), (str, list)):
            raise ValueError(f"{where}: \"sources\" must be a list of source ids and \"answer\" a string or a list")
        questions.append(record)
    return questions


def score_answer(answer: str, source: str | None, refusal: str = "",
                 refusal_patterns: list[re.Pattern] | None = None) -> dict:
    """{format_ok, citation_ok, refused} of one answer."""
    answer = answer.strip()
    cited = CITATION.search(answer)
    return {"format_ok": bool(HOUSE_FORMAT.match(answer)),
            "citation_ok": bool(cited) and source is not None and cited.group("source").strip() == source,
            "refused": is_refusal(answer, refusal, refusal_patterns or [])}


def share(flags: list[bool]) -> float:
    """Fraction of true flags (0 for none)."""
    return sum(flags) / len(flags) if flags else 0.0


def evaluate_generation(model: torch.nn.Module, tokenizer: TextTokenizer, path: str, template_name: str,
                        max_new_tokens: int, device: torch.device, max_examples: int = 0, refusal: str = "",
                        reference: torch.nn.Module | None = None, kl_samples: int = 0,
                        refusal_patterns: list[str] | tuple[str, ...] = ()) -> dict:
    """Greedy answers to the held-out questions -> format_adherence, citation_accuracy, refusal
    rates, the domain metrics (QA match, citation precision/recall, over/under-refusal), a few
    samples, and (with a `reference` model and kl_samples > 0) kl_to_reference."""
    questions = read_questions(path)[: max_examples or None]
    template = load_template(template_name, tokenizer.source)
    prompts = [chat_prompt_ids([{"role": "user", "content": q["prompt"]}], template, tokenizer) for q in questions]
    stop_ids, stop_strings = stop_conditions(template, tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=stop_strings,
                            stop_token_ids=stop_ids)
    sampler = NativeSampler.for_tokenizer(model, tokenizer, device)
    answers = [c.text for c in sampler.generate(prompts, params)]
    patterns = [re.compile(p) for p in refusal_patterns]
    firsts = [(gold_sources(q) or [None])[0] for q in questions]  # the citation rubric's one source
    scores = [score_answer(a, first, refusal, patterns) for a, first in zip(answers, firsts)]
    in_scope = [s for s, first in zip(scores, firsts) if first]
    out_of_scope = [s for s, first in zip(scores, firsts) if not first]
    result = {"format_adherence": share([s["format_ok"] for s in in_scope]),
              "citation_accuracy": share([s["citation_ok"] for s in in_scope]),
              "questions": len(scores), "in_scope": len(in_scope), "out_of_scope": len(out_of_scope),
              "samples": [{"prompt": q["prompt"], "answer": a.strip()} for q, a in list(zip(questions, answers))[:3]]}
    result.update(domain_metrics(questions, answers, refusal, refusal_patterns))
    if refusal or patterns:
        result["refusal_in_scope"] = share([s["refused"] for s in in_scope])
        if out_of_scope:
            result["refusal_out_of_scope"] = share([s["refused"] for s in out_of_scope])
            result["samples"] += [{"prompt": q["prompt"], "answer": a.strip()} for q, a, first
                                  in zip(questions, answers, firsts) if not first][:2]
    if reference is not None and kl_samples > 0:
        sampled = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=kl_samples, seed=1234,
                                 stop=stop_strings, stop_token_ids=stop_ids)
        result["kl_to_reference"] = sampled_kl(sampler, reference, prompts, sampled, device)
    return result


def sampled_kl(sampler: NativeSampler, reference: torch.nn.Module, prompts: list[list[int]],
               params: SamplingParams, device: torch.device) -> float:
    """Mean over sampled answers y ~ pi of log pi(y) - log pi_ref(y) (sequence log-probs; the
    sampler's log-probs are the policy's raw-model ones, the reference's are teacher forced)."""
    from megatron_domain.rollout.probe import completion_logprobs

    completions = sampler.generate(prompts, params)
    reference_logps = completion_logprobs(reference, [prompts[c.prompt_index] for c in completions],
                                          [c.token_ids for c in completions], device)
    gaps = [sum(c.logprobs) - sum(ref) for c, ref in zip(completions, reference_logps)]
    return float(sum(gaps) / len(gaps))
