"""Outputs that are never half-written: the text goes to a temporary name in the target's
folder and is renamed over the target only when complete."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    """`data` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(data, indent=2))


def write_jsonl_atomic(path: str | os.PathLike, records: list[dict]) -> None:
    """One JSON object per line, all at once, atomically."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
