"""Seed dialogues for the `rs_sft` mode: one JSON object per line.

    {"id": "s1", "system": "Answer in the house format.",
     "messages": [{"role": "user", "content": "What does pathlib do? Cite every answer."}],
     "constraints": ["cite every answer"], "turns": 6,
     "follow_ups": ["And os.path?", {"content": "What about shutil?", "source": "shutil"}],
     "source": "pathlib"}

- the opening: `messages` (user turns, optionally earlier assistant turns; it must end with a
  user turn) or `user` (one user message); `system` is prepended when given;
- `constraints`: what the whole dialogue must keep (free text, recorded for judges and reports);
- `turns`: assistant turns to generate (default rs_sft.turns);
- `follow_ups`: the user's next turns, strings or objects whose other keys are that turn's
  fields (e.g. the `source` a citation must name from then on); a seed without enough
  follow-ups takes the rest from the scripted list rs_sft.follow_ups (cycled);
- every other key is a field of the seed (judges fill rubric placeholders from it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from megatron_domain.data.chat import ChatDataError, jsonl_records, parse_messages

SEED_KEYS = ("id", "system", "messages", "user", "constraints", "turns", "follow_ups")


@dataclass
class FollowUp:
    """A scripted user turn and the fields that apply from that turn on."""

    content: str
    fields: dict = field(default_factory=dict)


@dataclass
class Seed:
    """One seed dialogue: its opening messages, constraints, turns and scripted follow-ups."""

    id: str
    opening: list[dict]
    turns: int
    constraints: list[str] = field(default_factory=list)
    follow_ups: list[FollowUp] = field(default_factory=list)
    fields: dict = field(default_factory=dict)
    where: str = ""


def parse_seed(record: object, where: str, default_turns: int, index: int) -> Seed:
    """One JSONL record -> a validated Seed (errors name `where`, the file and line)."""
    if not isinstance(record, dict):
        raise ChatDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        opening = parse_messages(record["messages"], where, need_assistant=False)
    elif isinstance(record.get("user"), str) and record["user"].strip():
        opening = [{"role": "user", "content": record["user"]}]
    else:
        raise ChatDataError(f"{where}: a seed needs its opening user message: \"user\": \"...\" or \"messages\": "
                            f"[{{\"role\": \"user\", \"content\": \"...\"}}], got keys {sorted(record)}")
    if opening[-1]["role"] != "user":
        raise ChatDataError(f"{where}: the opening messages must end with a user turn (the model answers it)")
    if record.get("system"):
        if not isinstance(record["system"], str):
            raise ChatDataError(f"{where}: \"system\" must be a string")
        opening = [{"role": "system", "content": record["system"]}] + opening
    turns = record.get("turns", default_turns)
    if not isinstance(turns, int) or isinstance(turns, bool) or turns < 1:
        raise ChatDataError(f"{where}: \"turns\" must be an integer >= 1 (assistant turns to generate), got {turns!r}")
    constraints = record.get("constraints", [])
    if not isinstance(constraints, list) or not all(isinstance(c, str) for c in constraints):
        raise ChatDataError(f"{where}: \"constraints\" must be a list of strings")
    follow_ups = []
    for i, item in enumerate(record.get("follow_ups", [])):
        if isinstance(item, str):
            follow_ups.append(FollowUp(item))
        elif isinstance(item, dict) and isinstance(item.get("content"), str):
            follow_ups.append(FollowUp(item["content"], {k: v for k, v in item.items() if k != "content"}))
        else:
            raise ChatDataError(f"{where}: follow_ups[{i}] must be a string or {{\"content\": \"...\", ...fields}}")
    seed_id = str(record.get("id", index))
    fields = {k: v for k, v in record.items() if k not in SEED_KEYS}
    return Seed(seed_id, opening, turns, constraints, follow_ups, fields, where)


def read_seeds(path: str | os.PathLike, default_turns: int) -> list[Seed]:
    """Every seed of a JSONL file; errors name the file and line (duplicate ids too)."""
    seeds, seen = [], {}
    for where, record in jsonl_records(path, "a seed dialogue"):
        seed = parse_seed(record, where, default_turns, len(seeds))
        if seed.id in seen:
            raise ChatDataError(f"{where}: seed id {seed.id!r} is also used at {seen[seed.id]}; ids must be unique")
        seen[seed.id] = where
        seeds.append(seed)
    return seeds


def follow_up(seed: Seed, turn: int, scripted: list[str]) -> FollowUp | None:
    """The user's turn before assistant turn `turn` (1-based, turn >= 2): the seed's own
    follow-ups first, then the scripted list cycled (offset by the seed's position so seeds do
    not all hear the same questions); None when there is nothing to ask."""
    index = turn - 2
    if index < len(seed.follow_ups):
        return seed.follow_ups[index]
    if not scripted:
        return None
    return FollowUp(scripted[(index - len(seed.follow_ups) + hash_index(seed.id)) % len(scripted)])


def hash_index(text: str) -> int:
    """A small stable integer from a string (Python's hash() changes between processes)."""
    return sum((i + 1) * ord(c) for i, c in enumerate(text))


def turn_fields(seed: Seed, turn: int, scripted: list[str]) -> dict:
    """The fields in force at assistant turn `turn`: the seed's, updated by each follow-up's so far."""
    fields = dict(seed.fields)
    for t in range(2, turn + 1):
        item = follow_up(seed, t, scripted)
        if item is not None:
            fields.update(item.fields)
    return fields
