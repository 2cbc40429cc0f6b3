"""Rubric checks on generated answers (greedy decoding): the house format of the SFT stage.

- format_adherence: share of answers that are exactly one line, a sentence ending in `.`, `!`
  or `?`, then `` [source: `<topic id>`]`` and nothing else;
- citation_accuracy: share of answers whose cited topic id is the question's source.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from megatron_domain.data.chat import load_template
from megatron_domain.data.tokenizer import TextTokenizer
from megatron_domain.rollout.sampler import greedy_generate

HOUSE_FORMAT = re.compile(r"^[^\n\[\]]{8,}[.!?] \[source: `(?P<source>[a-z0-9_-]+)`\]$")
CITATION = re.compile(r"\[source: `?(?P<source>[^\]`]+)`?\]")


def read_questions(path: str) -> list[dict]:
    """{"prompt", "source"} records of a JSONL file (errors name file and line)."""
    questions = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or "prompt" not in record or "source" not in record:
                raise ValueError(f"{path}:{number}: expected {{\"prompt\": ..., \"source\": ...}}")
            questions.append(record)
    if not questions:
        raise ValueError(f"{path}: no questions (eval.generation.path)")
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
    prompts = [tokenizer.tokenizer.encode(template.render([{"role": "user", "content": q["prompt"]}],
                                                         add_generation_prompt=True),
                                          add_special_tokens=False).ids for q in questions]
    stop = template.end_of_turn or tokenizer.tokenizer.id_to_token(tokenizer.eod_id)
    is_done = lambda ids: stop in tokenizer.decode(ids[-8:]) or tokenizer.eod_id in ids[-1:]  # noqa: E731
    outputs = greedy_generate(model, prompts, max_new_tokens, tokenizer.eod_id, device, is_done)
    answers = [tokenizer.tokenizer.decode(ids, skip_special_tokens=False).split(stop)[0] for ids in outputs]
    scores = [score_answer(a, q["source"]) for a, q in zip(answers, questions)]
    return {"format_adherence": sum(s["format_ok"] for s in scores) / len(scores),
            "citation_accuracy": sum(s["citation_ok"] for s in scores) / len(scores),
            "questions": len(scores),
            "samples": [{"prompt": q["prompt"], "answer": a.strip()} for q, a in list(zip(questions, answers))[:3]]}
