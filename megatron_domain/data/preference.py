"""Preference data for the `dpo` mode: JSONL pairs -> token ids of the prompt and of both
completions, and the padding-free micro-batch layouts the DPO step scores.

Input lines, in the formats TRL users already have:

- standard: `{"prompt": str, "chosen": str, "rejected": str[, "system": str]}`: the prompt is
  one user turn, each completion one assistant turn;
- conversational: `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`:
  `prompt` holds the conversation up to the last user turn, `chosen`/`rejected` the assistant
  turn(s) that follow;
- implicit prompt: `{"chosen": [messages], "rejected": [messages]}`: the shared leading
  messages are the prompt;
- pre-tokenized (TRL's tokenized columns): `{"prompt_ids": [int], "chosen_ids": [int],
  "rejected_ids": [int]}`: used as they are, no template.

Everything is rendered with the stage's chat template. The completion is the rendered text
after the prompt (with the generation prompt) up to and including the last end-of-turn marker,
tokenized on its own (as TRL does), so only completion tokens are scored.

Layouts of a micro-batch (all its pairs concatenated into ONE row: no padding at all):

- two-row (the reference): each pair is two documents, [prompt | chosen] and [prompt | rejected];
- shared prompt: each pair is one unit [prompt | chosen | rejected]; the chosen and rejected
  tokens attend to the prompt and to themselves only (`prefix_ids`, see models/attention.py)
  and their positions both restart right after the prompt, so the prompt is computed once.
  A pair whose unit would exceed data.seq_len is laid out as two documents instead.

Each completion token is scored at the position whose hidden state predicts it (`score_index`):
the first token of both completions is predicted from the prompt's last position.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from megatron_domain.data.chat import ChatDataError, ChatTemplate, jsonl_records, parse_messages
from megatron_domain.data.tokenizer import TextTokenizer


@dataclass
class PreferencePair:
    """One tokenized pair; `where` names its source (file:line, or round and prompt)."""

    prompt: np.ndarray  # [P] int64
    chosen: np.ndarray  # [C] int64
    rejected: np.ndarray  # [R] int64
    where: str = ""


def split_record(record: object, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt messages, chosen messages, rejected messages) of one JSONL record."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ChatDataError(f"{where}: a preference pair needs \"chosen\" and \"rejected\" (and usually "
                            f"\"prompt\"), got {keys}")
    prompt, chosen, rejected = record.get("prompt"), record["chosen"], record["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise ChatDataError(f"{where}: with string completions \"prompt\" must be a string too")
        system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        prompt_messages = system + [{"role": "user", "content": prompt}]
        return (prompt_messages, [{"role": "assistant", "content": chosen}],
                [{"role": "assistant", "content": rejected}])
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise ChatDataError(f"{where}: \"chosen\" and \"rejected\" must both be strings or both message lists")
    if prompt is None:  # implicit prompt: the shared leading messages
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        while shared > 0 and chosen[shared - 1].get("role") == "assistant":
            shared -= 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    prompt = parse_messages(prompt, where, need_assistant=False)
    if prompt[-1]["role"] != "user":
        raise ChatDataError(f"{where}: the prompt must end with a user turn, got {prompt[-1]['role']!r}")
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        parse_messages(completion, f"{where} ({name})", need_assistant=True)
        if completion[0]["role"] != "assistant":
            raise ChatDataError(f"{where}: \"{name}\" must start with the assistant turn that answers the prompt")
    return prompt, chosen, rejected


def completion_text(template: ChatTemplate, prompt: list[dict], completion: list[dict], where: str) -> str:
    """The rendered completion: the text after the prompt's generation prefix, cut after the
    last end-of-turn marker (the sampler stops there too)."""
    prompt_text = template.render(prompt, add_generation_prompt=True)
    full_text = template.render(prompt + completion)
    if not full_text.startswith(prompt_text):
        raise ChatDataError(f"{where}: the chat template renders the prompt differently with and without the "
                            "completion; cannot separate the completion tokens")
    text = full_text[len(prompt_text):]
    if template.end_of_turn and template.end_of_turn in text:
        text = text[: text.rindex(template.end_of_turn) + len(template.end_of_turn)]
    return text


def encode_pair(prompt: list[dict], chosen: list[dict], rejected: list[dict], template: ChatTemplate,
                tokenizer: TextTokenizer, where: str) -> PreferencePair:
    """Token ids of the prompt (with the generation prefix) and both completions; an empty
    completion or identical completions are errors naming `where`."""
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["content"].strip() for m in completion if m["role"] == "assistant"):
            raise ChatDataError(f"{where}: the {name} completion is empty; every pair needs two non-empty answers")
    if chosen == rejected:
        raise ChatDataError(f"{where}: chosen and rejected are identical, so the pair carries no preference; "
                            "remove it")
    encode = lambda text: np.asarray(tokenizer.tokenizer.encode(text, add_special_tokens=False).ids,  # noqa: E731
                                     dtype=np.int64)
    prompt_ids = encode(template.render(prompt, add_generation_prompt=True))
    return PreferencePair(prompt=prompt_ids, chosen=encode(completion_text(template, prompt, chosen, where)),
                          rejected=encode(completion_text(template, prompt, rejected, where)), where=where)


def fit_pair(pair: PreferencePair, seq_len: int, overflow: str) -> PreferencePair | None:
    """The pair within data.seq_len (prompt + the longer completion): completions truncated
    (`overflow: truncate`) or the pair left out (`drop`, returns None). A prompt that leaves no
    room for a completion is an error naming the pair."""
    if len(pair.prompt) + 1 > seq_len:
        raise ChatDataError(f"{pair.where}: the prompt is {len(pair.prompt)} tokens, longer than "
                            f"data.seq_len={seq_len} allows (it needs room for at least one completion "
                            "token); raise data.seq_len or shorten the prompt")
    room = seq_len - len(pair.prompt)
    if max(len(pair.chosen), len(pair.rejected)) <= room:
        return pair
    if overflow == "drop":
        return None
    return PreferencePair(pair.prompt, pair.chosen[:room], pair.rejected[:room], pair.where)


@dataclass
class PreferenceSet:
    """The pairs of a preference file after fitting, and what fitting did."""

    pairs: list[PreferencePair]
    truncated: int
    dropped: int


def tokenized_pair(record: dict, vocab_size: int, where: str) -> PreferencePair:
    """A pre-tokenized line (prompt_ids, chosen_ids, rejected_ids) checked like a text pair."""
    arrays = {}
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        ids = record.get(key)
        if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids):
            raise ChatDataError(f"{where}: \"{key}\" must be a list of token ids in [0, {vocab_size})")
        arrays[key] = np.asarray(ids, dtype=np.int64)
    for name in ("chosen", "rejected"):
        if len(arrays[f"{name}_ids"]) == 0:
            raise ChatDataError(f"{where}: the {name} completion is empty; every pair needs two non-empty answers")
    if not len(arrays["prompt_ids"]):
        raise ChatDataError(f"{where}: \"prompt_ids\" is empty; the completions need a prompt to answer")
    if np.array_equal(arrays["chosen_ids"], arrays["rejected_ids"]):
        raise ChatDataError(f"{where}: chosen and rejected are identical, so the pair carries no preference; "
                            "remove it")
    return PreferencePair(arrays["prompt_ids"], arrays["chosen_ids"], arrays["rejected_ids"], where)


def read_preferences(path: str | os.PathLike, template: ChatTemplate, tokenizer: TextTokenizer, seq_len: int,
                     overflow: str = "truncate") -> PreferenceSet:
    """Every pair of a JSONL file, tokenized and fitted; errors name the file and line."""
    pairs, truncated, dropped = [], 0, 0
    for where, record in jsonl_records(path, "a preference pair"):
        if isinstance(record, dict) and "prompt_ids" in record:
            pair = tokenized_pair(record, tokenizer.vocab_size, where)
        else:
            pair = encode_pair(*split_record(record, where), template, tokenizer, where)
        fitted = fit_pair(pair, seq_len, overflow)
        if fitted is None:
            dropped += 1
            continue
        truncated += fitted is not pair
        pairs.append(fitted)
    if not pairs:
        raise ChatDataError(f"{path}: no pair fits data.seq_len={seq_len} ({dropped} dropped)")
    return PreferenceSet(pairs, truncated, dropped)


@dataclass
class PairBatch:
    """One micro-batch of pairs in one row (tensors [1, L] unless noted).

    `score_index` [M] indexes the flattened row: the position whose output predicts completion
    token m, `score_targets` [M] that token, `score_segments` [M] = 2p for pair p's chosen
    tokens and 2p + 1 for its rejected ones. `reference_logps` [M] is filled in by the stage."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    document_ids: torch.Tensor
    prefix_ids: torch.Tensor | None
    score_index: torch.Tensor
    score_targets: torch.Tensor
    score_segments: torch.Tensor
    num_pairs: int

    def as_dict(self) -> dict:
        """The batch as the engine moves it (tensors to the device, the rest as is)."""
        return dict(vars(self))


class _RowBuilder:
    """Appends documents to one packed row and records where completion tokens are scored."""

    def __init__(self) -> None:
        self.tokens: list[np.ndarray] = []
        self.positions: list[np.ndarray] = []
        self.documents: list[np.ndarray] = []
        self.prefixes: list[np.ndarray] = []
        self.index: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.segments: list[np.ndarray] = []
        self.length = 0
        self.num_docs = 0

    def add(self, ids: np.ndarray, first_position: int, prefix_doc: int) -> int:
        """Append a document of `ids` with positions from `first_position`; returns its doc id."""
        doc = self.num_docs
        self.num_docs += 1
        self.tokens.append(ids)
        self.positions.append(np.arange(first_position, first_position + len(ids)))
        self.documents.append(np.full(len(ids), doc))
        self.prefixes.append(np.full(len(ids), doc if prefix_doc < 0 else prefix_doc))
        self.length += len(ids)
        return doc

    def score(self, completion: np.ndarray, predictor_of_first: int, start: int, segment: int) -> None:
        """Completion token 0 is predicted at row position `predictor_of_first`, token j >= 1 at
        `start + j - 1` (where completion token j - 1 was fed)."""
        index = np.concatenate([[predictor_of_first], start + np.arange(len(completion) - 1)])
        self.index.append(index)
        self.targets.append(completion)
        self.segments.append(np.full(len(completion), segment))

    def add_pair(self, pair: PreferencePair, p: int, shared: bool) -> None:
        """Pair number `p` of the batch, as one shared-prompt unit or as two documents."""
        prompt_len = len(pair.prompt)
        if shared:
            prompt_start = self.length
            prompt_doc = self.add(pair.prompt, 0, -1)
            last_prompt = prompt_start + prompt_len - 1
            for segment, completion in ((2 * p, pair.chosen), (2 * p + 1, pair.rejected)):
                start = self.length
                self.add(completion[:-1], prompt_len, prompt_doc)
                self.score(completion, last_prompt, start, segment)
            return
        for segment, completion in ((2 * p, pair.chosen), (2 * p + 1, pair.rejected)):
            start = self.length
            self.add(np.concatenate([pair.prompt, completion[:-1]]), 0, -1)
            self.score(completion, start + prompt_len - 1, start + prompt_len, segment)

    def pad_to_multiple(self, multiple: int, pad_id: int) -> None:
        """Padding (its own document, never scored) up to a multiple of `multiple` positions."""
        extra = -self.length % multiple
        if extra:
            self.add(np.full(extra, pad_id), 0, -1)

    def build(self, num_pairs: int, with_prefix: bool) -> PairBatch:
        row = lambda parts: torch.from_numpy(np.concatenate(parts).astype(np.int64))[None]  # noqa: E731
        flat = lambda parts: torch.from_numpy(np.concatenate(parts).astype(np.int64))  # noqa: E731
        return PairBatch(tokens=row(self.tokens), position_ids=row(self.positions), document_ids=row(self.documents),
                         prefix_ids=row(self.prefixes) if with_prefix else None, score_index=flat(self.index),
                         score_targets=flat(self.targets), score_segments=flat(self.segments), num_pairs=num_pairs)


def pair_batch(pairs: list[PreferencePair], shared_prompt: bool, seq_len: int, pad_id: int,
               pad_multiple: int = 1) -> PairBatch:
    """The micro-batch of `pairs` in one padding-free row: shared-prompt units where they fit
    data.seq_len (`shared_prompt`), else two documents per pair (the reference layout)."""
    builder = _RowBuilder()
    for p, pair in enumerate(pairs):
        unit = len(pair.prompt) + len(pair.chosen) + len(pair.rejected) - 2
        builder.add_pair(pair, p, shared_prompt and unit <= seq_len)
    builder.pad_to_multiple(pad_multiple, pad_id)
    return builder.build(len(pairs), with_prefix=shared_prompt)


def pair_tokens(pair: PreferencePair) -> int:
    """Prompt + chosen + rejected tokens: what a pair costs, as the benchmark counts it."""
    return len(pair.prompt) + len(pair.chosen) + len(pair.rejected)


def pipeline_row_length(micro_batch_size: int, seq_len: int, multiple: int = 1) -> int:
    """Positions of one micro-batch row under pipeline parallelism, where every row of a run has
    the same shape (a schedule fixes its shapes at its first step): a fitted pair takes at most
    2 (seq_len - 1) positions (two documents of prompt + completion - 1; a shared-prompt unit is
    shorter) and scores at most as many tokens, rounded up to a multiple of `multiple`."""
    length = micro_batch_size * 2 * (seq_len - 1)
    return length + (-length % multiple)


def fixed_length_batch(batch: dict, length: int, pad_id: int) -> dict:
    """A pair batch (`pair_batch(...).as_dict()`) with its row padded to `length` positions (a
    padding document, never scored) and its scored-token arrays as [1, length] rows: unused
    slots score position 0 with segment -1 (and reference log-prob 0 when present)."""
    row_len, scored = batch["tokens"].shape[1], batch["score_index"].shape[0]
    if row_len > length or scored > length:
        raise ValueError(f"a pair micro-batch of {row_len} positions and {scored} scored tokens exceeds the pipeline "
                         f"row of {length}")
    pad = length - row_len
    pad_doc = int(batch["document_ids"].max()) + 1

    def row(values: torch.Tensor | None, fill: torch.Tensor) -> torch.Tensor | None:
        return None if values is None else torch.cat([values, fill.to(values)[None]], dim=1)  # [1, length]

    def scored_row(values: torch.Tensor, fill: float) -> torch.Tensor:
        return torch.cat([values, values.new_full((length - scored,), fill)])[None]  # [1, length]

    out = dict(batch)
    out["tokens"] = row(batch["tokens"], torch.full((pad,), pad_id))
    out["position_ids"] = row(batch["position_ids"], torch.arange(pad))
    out["document_ids"] = row(batch["document_ids"], torch.full((pad,), pad_doc))
    out["prefix_ids"] = row(batch["prefix_ids"], torch.full((pad,), pad_doc))
    out["score_index"] = scored_row(batch["score_index"], 0)
    out["score_targets"] = scored_row(batch["score_targets"], 0)
    out["score_segments"] = scored_row(batch["score_segments"], -1)
    if "reference_logps" in batch:
        out["reference_logps"] = scored_row(batch["reference_logps"], 0.0)
    return out
