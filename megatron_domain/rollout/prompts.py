"""Prompts for generation: chat messages rendered with the run's template (exactly the text
training saw before an assistant turn), plain text, and where generation must stop.

A chat turn ends at the template's end-of-turn marker: a stop *token* when the tokenizer has
it as one token (`<|im_end|>`, `<|eot_id|>`), a stop *string* otherwise; the end-of-document
token always stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_domain.data.chat import ChatTemplate, jsonl_records, parse_messages
from megatron_domain.data.tokenizer import TextTokenizer


@dataclass
class PromptRecord:
    """One line of a prompts file: chat `messages` or a plain `prompt` text, optional id/seed;
    `fields`: the line's other keys (what judges check against, e.g. a known `source`)."""

    id: str
    messages: list[dict] | None = None
    text: str | None = None
    seed: int | None = None
    fields: dict = field(default_factory=dict)


def chat_prompt_ids(messages: list[dict], template: ChatTemplate, tokenizer: TextTokenizer) -> list[int]:
    """Token ids of `messages` followed by the assistant header (what the model continues)."""
    text = template.render(messages, add_generation_prompt=True)
    return tokenizer.tokenizer.encode(text, add_special_tokens=False).ids


def stop_conditions(template: ChatTemplate | None, tokenizer: TextTokenizer) -> tuple[list[int], list[str]]:
    """(stop token ids, stop strings) for answers in `template` (None: plain text, EOD only)."""
    ids, strings = [tokenizer.eod_id], []
    markers = [template.end_of_turn, template.eos_token] if template is not None else []
    for marker in filter(None, markers):
        token_id = tokenizer.tokenizer.token_to_id(marker)
        if token_id is not None:
            ids.append(token_id)
        else:
            strings.append(marker)
    return sorted(set(ids)), strings


def read_prompts(path: str | Path) -> list[PromptRecord]:
    """JSONL prompts: {"messages": [...]} (chat) or {"prompt": "text"} (plain), each with an
    optional "id" and "seed". Errors name the file and line."""
    records = []
    for where, data in jsonl_records(path, "a prompt"):
        if not isinstance(data, dict) or not (("messages" in data) ^ ("prompt" in data)):
            raise ValueError(f"{where}: expected {{\"messages\": [...]}} or {{\"prompt\": \"...\"}} (one of them)")
        seed = data.get("seed")
        if seed is not None and not isinstance(seed, int):
            raise ValueError(f"{where}: \"seed\" must be an integer, got {seed!r}")
        record_id = str(data.get("id", len(records)))
        fields = {k: v for k, v in data.items() if k not in ("messages", "prompt", "id", "seed")}
        if "messages" in data:
            messages = parse_messages(data["messages"], where, need_assistant=False)
            if messages[-1]["role"] == "assistant":
                raise ValueError(f"{where}: the last message is the assistant's; a prompt ends with a user turn")
            records.append(PromptRecord(record_id, messages=messages, seed=seed, fields=fields))
        else:
            if not isinstance(data["prompt"], str) or not data["prompt"]:
                raise ValueError(f"{where}: \"prompt\" must be a non-empty string")
            records.append(PromptRecord(record_id, text=data["prompt"], seed=seed, fields=fields))
    return records
