"""The embedded demo corpora, extracted from the local Python installation (no downloads).

- domain: the Python language reference shipped in `pydoc_data.topics`, each topic cut into
  sections at paragraph boundaries;
- general: the standard library's docstrings (modules, classes, functions), read with `ast`
  from the source files (nothing is imported).

Held-out documents are chosen by a hash of their key, so the split is stable across runs.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
from pathlib import Path

from megatron_domain.config import DemoDataConfig
from megatron_domain.data.indexed import write_indexed_dataset
from megatron_domain.data.preprocess import tokenize_documents
from megatron_domain.data.tokenizer import CHATML_SPECIALS, train_bpe_tokenizer

SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo", "ensurepip"}
MANIFEST_VERSION = 5  # 4: chatml markers are special tokens; 5: the multiple-choice suites


def unwrap_paragraphs(text: str) -> str:
    """Join the hard-wrapped lines of prose paragraphs with spaces; paragraphs holding code
    (indented lines, `>>>` prompts) keep their line breaks. Both corpora are wrapped at
    different widths, and where a line break falls says nothing about either domain."""
    out = []
    for paragraph in text.split("\n\n"):
        lines = paragraph.split("\n")
        is_code = any(line.startswith((" ", "\t", ">>>", "...")) for line in lines)
        has_heading = any(line.strip() and set(line.strip()) <= set("=*-~^") for line in lines)
        out.append(paragraph if is_code or has_heading else " ".join(line.strip() for line in lines if line.strip()))
    return "\n\n".join(out)


def domain_documents(section_chars: int = 1500) -> list[tuple[str, str]]:
    """(key, text) sections of the language reference topics, ~`section_chars` long each."""
    from pydoc_data.topics import topics

    docs = []
    for topic in sorted(topics):
        section, part = [], 0
        for paragraph in topics[topic].split("\n\n"):
            section.append(unwrap_paragraphs(paragraph))
            if sum(len(p) for p in section) >= section_chars:
                docs.append((f"{topic}#{part}", "\n\n".join(section).strip()))
                section, part = [], part + 1
        if section and "\n\n".join(section).strip():
            docs.append((f"{topic}#{part}", "\n\n".join(section).strip()))
    return docs


def general_documents(min_chars: int = 40) -> list[tuple[str, str]]:
    """(module path, text): one document per stdlib module holding its module, class and
    function docstrings (module first, then breadth-first), paragraphs unwrapped."""
    stdlib = sysconfig.get_paths()["stdlib"]
    docs = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            try:
                tree = ast.parse(Path(path).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            parts = []
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    text = ast.get_docstring(node)
                    if text and len(text) >= min_chars:
                        parts.append(unwrap_paragraphs(text))
            if parts:
                docs.append((os.path.relpath(path, stdlib), "\n\n".join(parts)))
    return docs


def is_heldout(key: str, fraction: float, seed: int) -> bool:
    """Stable pseudo-random choice of held-out documents by hashing their key."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def split_documents(docs: list[tuple[str, str]], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts)."""
    train = [text for key, text in docs if not is_heldout(key, fraction, seed)]
    heldout = [text for key, text in docs if is_heldout(key, fraction, seed)]
    return train, heldout


def prepare_demo_data(out_dir: str | os.PathLike, cfg: DemoDataConfig, progress: bool = True) -> dict:
    """Extract both corpora, train the demo tokenizer on the training halves, and write
    `tokenizer.json` and the indexed datasets {general,domain}_{train,heldout} to `out_dir`.
    Reuses earlier output when its manifest matches the settings."""
    out = Path(out_dir)
    manifest_file = out / "manifest.json"
    settings = {"version": MANIFEST_VERSION, "vocab_size": cfg.vocab_size, "heldout_fraction": cfg.heldout_fraction,
                "max_general_docs": cfg.max_general_docs, "max_domain_docs": cfg.max_domain_docs, "seed": cfg.seed,
                "curate": cfg.curate}
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("settings") == settings:
            return manifest
    corpora = {"general": general_documents(), "domain": domain_documents()}
    limits = {"general": cfg.max_general_docs, "domain": cfg.max_domain_docs}
    splits = {}
    for name, docs in corpora.items():
        if limits[name]:
            docs = docs[:: max(1, len(docs) // limits[name])][: limits[name]]  # evenly spread subset
        splits[name] = split_documents(docs, cfg.heldout_fraction, cfg.seed)
    train_texts = splits["general"][0] + splits["domain"][0]
    # the chat markers of the SFT stage's chatml template are special tokens (as in Qwen's tokenizer),
    # so a chat turn ends at one token and the exported model stops there
    tokenizer = train_bpe_tokenizer(train_texts, cfg.vocab_size, out / "tokenizer.json", CHATML_SPECIALS)
    stats, curation = {}, None
    if cfg.curate:  # the domain training documents go through `mdt data curate` (data/demo_curation.py)
        from megatron_domain.data.demo_curation import curate_demo_domain, curation_summary

        report = curate_demo_domain(out, splits["domain"][0], splits["general"][0], str(out / "tokenizer.json"),
                                    cfg.seed, progress=progress)
        stats["domain_train"] = {k: report["tokenized"][k] for k in ("documents", "tokens")}
        curation = {"summary": curation_summary(report), "injected": report["injected"],
                    "report": str(out / "curated_domain" / "curation_report.md")}
    for name, (train, heldout) in splits.items():
        for split, texts in (("train", train), ("heldout", heldout)):
            if curation and (name, split) == ("domain", "train"):
                continue
            docs = tokenize_documents(iter(texts), tokenizer, progress=progress, desc=f"{name}_{split}")
            stats[f"{name}_{split}"] = write_indexed_dataset(out / f"{name}_{split}", docs, tokenizer.vocab_size)
    for name, (_, heldout) in splits.items():  # the lm-eval suites (eval/suites.py: demo_general_mc, ...)
        write_continuation_mc(heldout, out / "mc" / f"{name}_mc.jsonl", cfg.seed)
    manifest = {"settings": settings, "tokenizer": str(out / "tokenizer.json"), "datasets": stats,
                **({"curation": curation} if curation else {})}
    tmp = manifest_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, manifest_file)
    return manifest


def continuation_mc(texts: list[str], seed: int, context_words: int = 40, continuation_words: int = 8,
                    max_items: int = 200) -> list[dict]:
    """Multiple-choice items from held-out texts: a passage of `context_words` words, and its
    true next `continuation_words` words among three other orders of the same words. Every
    choice holds the same words, so word frequencies cannot pick the answer: the model must
    know how the text goes on (a 1M-parameter demo model reaches ~95% after pre-training, and
    choices drawn from other passages left it at chance, too weak a signal to gate on).
    Windows start every context_words / 2 words of each text; at most `max_items`, in a seeded
    order."""
    import random

    rng = random.Random(seed)
    span = context_words + continuation_words
    windows = []  # (context, continuation words)
    for text in texts:
        words = text.split()
        for start in range(0, len(words) - span + 1, context_words // 2):
            windows.append((" ".join(words[start:start + context_words]), words[start + context_words:start + span]))
    rng.shuffle(windows)
    items = []
    for context, continuation in windows:
        true = " ".join(continuation)
        others: list[str] = []
        for _ in range(50):
            shuffled = continuation[:]
            rng.shuffle(shuffled)
            candidate = " ".join(shuffled)
            if candidate != true and candidate not in others:
                others.append(candidate)
            if len(others) == 3:
                break
        if len(others) < 3:  # too few distinct words to reorder
            continue
        label = rng.randrange(4)
        items.append({"context": context, "choices": others[:label] + [true] + others[label:], "label": label})
        if len(items) == max_items:
            break
    return items


def write_continuation_mc(texts: list[str], out_file: Path, seed: int) -> int:
    """Write `continuation_mc(texts)` as JSONL (atomically); returns the item count."""
    items = continuation_mc(texts, seed)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    tmp.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    os.replace(tmp, out_file)
    return len(items)
