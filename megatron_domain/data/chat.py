"""Chat data for the `sft` mode: JSONL conversations -> token ids + a loss mask that covers
every assistant turn (its content and the end-of-turn marker after it) and nothing else.

Input lines: `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}` or
`{"prompt": ..., "response": ...[, "system": ...]}`. Templates are Jinja, rendered as Hugging
Face renders `chat_template` (sandboxed, trim_blocks, lstrip_blocks, `raise_exception`):
`llama3` and `chatml` are built in; `tokenizer` uses the tokenizer folder's own template
(tokenizer_config.json or chat_template.jinja). The mask is computed on the rendered text:
each assistant content is located in it, together with an end-of-turn marker that follows
(the template's special token); tokens that start inside those spans are trained.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from megatron_domain.data.tokenizer import TextTokenizer

ROLES = ("system", "user", "assistant")
BUILTIN_TEMPLATES = {
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "chatml": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}
END_OF_TURN = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}
BOS = {"llama3": "<|begin_of_text|>", "chatml": ""}


class ChatDataError(ValueError):
    """Bad chat data: names the file and line and what to fix."""


@dataclass
class ChatTemplate:
    """A Jinja chat template plus the marker that ends an assistant turn."""

    name: str
    source: str
    end_of_turn: str
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text, exactly as Hugging Face's apply_chat_template renders it."""
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda value, **kw: json.dumps(value, ensure_ascii=False, **kw)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                   bos_token=self.bos_token, eos_token=self.eos_token)


def load_template(name: str, tokenizer_path: str = "") -> ChatTemplate:
    """`llama3`, `chatml`, or `tokenizer` (the template shipped with the tokenizer folder)."""
    if name in BUILTIN_TEMPLATES:
        return ChatTemplate(name, BUILTIN_TEMPLATES[name], END_OF_TURN[name], bos_token=BOS[name])
    if name != "tokenizer":
        raise ChatDataError(f"data.chat.template: unknown {name!r}; choose llama3, chatml or tokenizer")
    folder = Path(tokenizer_path)
    folder = folder if folder.is_dir() else folder.parent
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    source = config.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        source = (folder / "chat_template.jinja").read_text()
    if isinstance(source, list):  # named templates: use the default one
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    if not source:
        raise ChatDataError(f"data.chat.template=tokenizer: {folder} has no chat_template (tokenizer_config.json "
                            "or chat_template.jinja); use llama3 or chatml")
    token = lambda v: v.get("content", "") if isinstance(v, dict) else (v or "")  # noqa: E731
    return ChatTemplate("tokenizer", source, end_of_turn="", bos_token=token(config.get("bos_token")),
                        eos_token=token(config.get("eos_token")))


def split_markers(template: ChatTemplate, tokenizer: TextTokenizer) -> dict[str, int]:
    """{marker: number of tokens} for each `<|...|>` marker of the template (and its end-of-turn
    and bos) that the tokenizer does not have as one token."""
    markers = set(re.findall(r"<\|[A-Za-z0-9_]+\|>", template.source))
    markers |= {m for m in (template.end_of_turn, template.bos_token) if m}
    return {m: len(tokenizer.encode(m)) for m in sorted(markers) if tokenizer.tokenizer.token_to_id(m) is None}


def warn_if_markers_split(template: ChatTemplate, tokenizer: TextTokenizer) -> dict[str, int]:
    """Warn when the chat template's markers are not single tokens of the tokenizer (a Llama 3
    template on a tokenizer without <|eot_id|>): the model must then learn them as text and a
    served export cannot stop at the end of a turn. Returns `split_markers`."""
    split = split_markers(template, tokenizer)
    if split:
        listed = ", ".join(f"{m} -> {n} tokens" for m, n in split.items())
        warnings.warn(f"data.chat.template={template.name}: {listed}: not single tokens of {tokenizer.source}. Use "
                      "the template of the model family the tokenizer belongs to, or add these markers to the "
                      "tokenizer as special tokens (and resize the model's vocabulary) before training",
                      stacklevel=2)
    return split


def parse_example(record: object, where: str) -> list[dict]:
    """One JSONL record -> validated messages."""
    if not isinstance(record, dict):
        raise ChatDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "response" in record:
        messages = ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + [
            {"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    else:
        raise ChatDataError(f"{where}: needs \"messages\" or \"prompt\" + \"response\", got keys {sorted(record)}")
    return parse_messages(messages, where)


def parse_messages(messages: object, where: str, need_assistant: bool = True) -> list[dict]:
    """A validated list of {"role", "content"} messages (`where` names the file and line)."""
    if not isinstance(messages, list) or not messages:
        raise ChatDataError(f"{where}: \"messages\" must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            raise ChatDataError(f"{where}: message {i} has unknown role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ChatDataError(f"{where}: message {i} ({message['role']}) needs a string \"content\"")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ChatDataError(f"{where}: the conversation has no assistant turn, so nothing would be trained")
    return messages


def jsonl_records(path: str | os.PathLike, what: str) -> Iterator[tuple[str, object]]:
    """(`file:line`, parsed JSON) for every non-empty line of a JSONL file of `what`; a missing
    file, bad JSON or an empty file raise ChatDataError naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(f"{path}: no such file")
    found = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ChatDataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        found = True
        yield f"{path}:{number}", record
    if not found:
        raise ChatDataError(f"{path}: the file is empty; expected one JSON object ({what}) per line")


def read_conversations(path: str | os.PathLike) -> list[list[dict]]:
    """All conversations of a JSONL file; errors name the file and line."""
    return [parse_example(record, where) for where, record in jsonl_records(path, "a conversation")]


def trained_spans(text: str, messages: list[dict], end_of_turn: str,
                  special_tokens: list[str]) -> list[tuple[int, int]]:
    """Character spans of `text` to train on: each assistant content (located in order) plus
    the end-of-turn marker right after it (the template's, or any special token there)."""
    spans, cursor = [], 0
    for message in messages:
        content = message["content"].strip()
        start = text.find(content, cursor)
        if start < 0:
            raise ChatDataError("the chat template does not reproduce a message's content verbatim; "
                                "cannot mask the loss")
        end = start + len(content)
        cursor = end
        if message["role"] != "assistant":
            continue
        markers = [end_of_turn] if end_of_turn else sorted(special_tokens, key=len, reverse=True)
        for marker in markers:
            if marker and text.startswith(marker, end):
                end += len(marker)
                break
        spans.append((start, end))
    return spans


def encode_conversation(messages: list[dict], template: ChatTemplate, tokenizer: TextTokenizer,
                        train_turns: list[bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [T], trained [T] bool) where trained[i] says whether token i is a target.
    `train_turns`: which assistant messages (in order) are trained (default: all)."""
    text = template.render(messages)
    encoding = tokenizer.tokenizer.encode(text, add_special_tokens=False)
    spans = trained_spans(text, messages, template.end_of_turn, tokenizer.special_tokens())
    if train_turns is not None:
        if len(train_turns) != len(spans):
            raise ValueError(f"train_turns has {len(train_turns)} entries for {len(spans)} assistant messages")
        spans = [span for span, keep in zip(spans, train_turns) if keep]
    ids = np.asarray(encoding.ids, dtype=np.int64)
    starts = np.asarray([start for start, _ in encoding.offsets], dtype=np.int64)
    trained = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        trained |= (starts >= start) & (starts < end)
    return ids, trained


@dataclass
class PackedChat:
    """Conversations packed into rows of `seq_len` positions; all arrays [R, S]."""

    tokens: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    position_ids: np.ndarray
    document_ids: np.ndarray
    truncated: int  # examples cut to seq_len
    dropped: int  # examples left out


def pack_conversations(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int,
                       overflow: str = "truncate") -> PackedChat:
    """Best-fit-decreasing packing: each example (ids [T], trained [T]) becomes T - 1
    positions (input ids[:-1], label ids[1:], trained[1:]); the longest go first, each into the
    row with the least room that still fits it. Examples longer than seq_len are truncated or
    dropped (`overflow`). Positions restart per example; padding is masked and is its own
    document."""
    items, truncated, dropped = [], 0, 0
    for ids, trained in examples:
        if len(ids) - 1 > seq_len:
            if overflow == "drop":
                dropped += 1
                continue
            ids, trained = ids[: seq_len + 1], trained[: seq_len + 1]
            truncated += 1
        if len(ids) >= 2 and trained[1:].any():
            items.append((ids, trained))
    items.sort(key=lambda item: len(item[0]), reverse=True)
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    room: list[int] = []
    for ids, trained in items:
        need = len(ids) - 1
        candidates = [r for r in range(len(rows)) if room[r] >= need]
        if candidates:
            best = min(candidates, key=lambda r: room[r])
        else:
            rows.append([])
            room.append(seq_len)
            best = len(rows) - 1
        rows[best].append((ids, trained))
        room[best] -= need
    shape = (len(rows), seq_len)
    out = PackedChat(tokens=np.full(shape, pad_id, np.int64), labels=np.full(shape, pad_id, np.int64),
                     loss_mask=np.zeros(shape, bool), position_ids=np.zeros(shape, np.int64),
                     document_ids=np.zeros(shape, np.int64), truncated=truncated, dropped=dropped)
    for r, row in enumerate(rows):
        pos = 0
        for doc, (ids, trained) in enumerate(row):
            n = len(ids) - 1
            out.tokens[r, pos:pos + n] = ids[:-1]
            out.labels[r, pos:pos + n] = ids[1:]
            out.loss_mask[r, pos:pos + n] = trained[1:]
            out.position_ids[r, pos:pos + n] = np.arange(n)
            out.document_ids[r, pos:pos + n] = doc
            pos += n
        out.document_ids[r, pos:] = len(row)  # padding: its own document, never trained
        out.position_ids[r, pos:] = np.arange(seq_len - pos)
    return out
