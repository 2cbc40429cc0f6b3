"""`mdt data preprocess`: JSONL or text files -> tokenized Megatron indexed dataset.

JSONL: one JSON object per line with the text under `json_key` (default "text"); blank lines
are skipped. Text files (any other suffix): each file is one document. Every document is
followed by the EOD token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from megatron_domain.data.indexed import write_indexed_dataset
from megatron_domain.data.tokenizer import TextTokenizer


def iter_texts(files: list[str], json_key: str = "text") -> Iterator[str]:
    """Yield document texts; malformed input raises ValueError naming file and line."""
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"input file {path} does not exist")
        if path.suffix not in (".jsonl", ".json"):
            yield path.read_text(encoding="utf-8", errors="replace")
            continue
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno}); "
                                     "each line must be one JSON object") from exc
                if not isinstance(record, dict) or json_key not in record:
                    keys = list(record) if isinstance(record, dict) else type(record).__name__
                    raise ValueError(f"{path}:{lineno}: no {json_key!r} field (found {keys}); "
                                     "fix the line or pass --json-key")
                if not isinstance(record[json_key], str):
                    raise ValueError(f"{path}:{lineno}: field {json_key!r} must be a string, "
                                     f"got {type(record[json_key]).__name__}")
                yield record[json_key]


def tokenize_documents(texts: Iterator[str], tokenizer: TextTokenizer, batch_size: int = 512,
                       progress: bool = True, desc: str = "tokenize") -> Iterator[list[int]]:
    """Encode texts in batches, appending EOD; empty documents are dropped."""
    bar = tqdm(desc=desc, unit="doc", disable=not progress)
    batch: list[str] = []

    def flush() -> Iterator[list[int]]:
        for ids in tokenizer.encode_batch(batch):
            if ids:
                yield ids + [tokenizer.eod_id]
        bar.update(len(batch))
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) >= batch_size:
            yield from flush()
    if batch:
        yield from flush()
    bar.close()


def preprocess(files: list[str], tokenizer: TextTokenizer, output_prefix: str, json_key: str = "text",
               progress: bool = True) -> dict:
    """Tokenize `files` into `output_prefix.bin/.idx`; returns {documents, tokens}. Nothing is
    left half-written: the files appear only once complete."""
    docs = tokenize_documents(iter_texts(files, json_key), tokenizer, progress=progress)
    return write_indexed_dataset(output_prefix, docs, tokenizer.vocab_size)
