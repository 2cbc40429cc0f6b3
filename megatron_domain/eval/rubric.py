"""Rubric checks on generated answers (greedy decoding with the native sampler): the house
format of the SFT stage.

- format_adherence: share of answers that are exactly one line, a sentence ending in `.`, `!`
  or `?`, then `` [source: `<topic id>`]`` and nothing else;
- citation_accuracy: share of answers whose cited topic id is the question's source.
"""

from __future__ import annotations

import re

import torch

from megatron_domain.data.chat import jsonl_records, load_template
from megatron_domain.data.tokenizer import TextTokenizer
from megatron_domain.rollout.native import NativeSampler
from megatron_domain.rollout.prompts import chat_prompt_ids, stop_conditions
from megatron_domain.rollout.sampling import SamplingParams

HOUSE_FORMAT = re.compile(r"^[^\n\[\]]{8,}[.!?] \[source: `(?P<source>[a-z0-9_-]+)`\]$")
CITATION = re.compile(r"\[source: `?(?P<source>[^\]`]+)`?\]")


def read_questions(path: str) -> list[dict]:
    """{"prompt", "source"} records of a JSONL file (errors name file and line)."""
    questions = []
    for where, record in jsonl_records(path, "a question (eval.generation.path)"):
        if not isinstance(record, dict) or "prompt" not in record or "source" not in record:
            raise ValueError(f"{where}: expected {{\"prompt\": ..., \"source\": ...}}")
        questions.append(record)
    return questions


def score_answer(answer: str, source: str) -> dict:
    """{format_ok, citation_ok} of one answer."""
    answer = answer.strip()
    cited = CITATION.search(answer)
    return {"format_ok": bool(HOUSE_FORMAT.match(answer)),
            "citation_ok": bool(cited) and cited.group("source").strip() == source}


def evaluate_generation(model: torch.nn.Module, tokenizer: TextTokenizer, path: str, template_name: str,
                        max_new_tokens: int, device: torch.device, max_examples: int = 0) -> dict:
    """Greedy answers to the held-out questions -> format_adherence, citation_accuracy and a
    few samples."""
    questions = read_questions(path)[: max_examples or None]
    template = load_template(template_name, tokenizer.source)
    prompts = [chat_prompt_ids([{"role": "user", "content": q["prompt"]}], template, tokenizer) for q in questions]
    stop_ids, stop_strings = stop_conditions(template, tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=stop_strings,
                            stop_token_ids=stop_ids)
    answers = [c.text for c in NativeSampler.for_tokenizer(model, tokenizer, device).generate(prompts, params)]
    scores = [score_answer(a, q["source"]) for a, q in zip(answers, questions)]
    return {"format_adherence": sum(s["format_ok"] for s in scores) / len(scores),
            "citation_accuracy": sum(s["citation_ok"] for s in scores) / len(scores),
            "questions": len(scores),
            "samples": [{"prompt": q["prompt"], "answer": a.strip()} for q, a in list(zip(questions, answers))[:3]]}
