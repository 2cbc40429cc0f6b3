"""The `mdt data curate` configuration (YAML):

    inputs: [data/raw/manuals, data/raw/tickets]   # folders (every supported file below them)
    output_dir: data/curated
    text_key: text                                 # the field of .jsonl records
    tokenizer: /models/Llama-3.1-8B                # optional: also write the indexed dataset
    workers: 2                                     # processes on this machine
    exact_dedup: {enabled: true, unit: lines, span: 1, min_span_words: 10}
    near_dedup: {enabled: true, n_grams: 5, bands: 30, rows: 10}
    pii: {enabled: true, types: [email, phone, ip, credit_card, iban, national_id]}
    quality: {enabled: true, min_words: 50, max_words: 100000, max_symbol_word_ratio: 0.1, ...}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_domain.config import ConfigError, build_dataclass, load_yaml
from megatron_domain.data.curate.pii import PII_TYPES


@dataclass
class ExactDedupConfig:
    """Exact dedup of chunks: every span of `span` consecutive `unit`s (lines, i.e. paragraphs of
    JSONL text, or sentences) seen before is removed from the later documents (datatrove's span
    dedup, as in C4), unless it has fewer than `min_span_words` words (short lines such as
    headings or code braces stay); a document left with fewer than `min_doc_words` words (a
    duplicated document: none) is dropped."""

    enabled: bool = True
    unit: str = "lines"
    span: int = 1
    min_span_words: int = 10
    min_doc_words: int = 1


@dataclass
class NearDedupConfig:
    """MinHash LSH over word `n_grams` (after normalization): `bands` x `rows` hashes; two
    documents are candidates when all rows of one band agree, which happens with probability
    1 - (1 - J^rows)^bands at Jaccard similarity J (the threshold, where it is 1/2, is about
    (1/bands)^(1/rows): 0.71 for 30 x 10; at J = 0.8 a pair is found with probability 0.966, at
    J = 0.44 with 0.008: tools/bench_curate.py measured recall and precision 1.0 on pairs at
    0.81-0.93 against near-misses at 0.44, where 20 x 8 also removed 2 of 16 near-misses).
    Each cluster keeps one document."""

    enabled: bool = True
    n_grams: int = 5
    bands: int = 30
    rows: int = 10
    seed: int = 1


@dataclass
class PiiConfig:
    """Pattern-based PII redaction (curate/pii.py): typed placeholders for the listed types."""

    enabled: bool = True
    types: list[str] = field(default_factory=lambda: list(PII_TYPES))


@dataclass
class QualityConfig:
    """Gopher-style heuristics (datatrove's GopherQualityFilter and GopherRepetitionFilter):
    word count, mean word length, symbol / word ratio, share of lines starting with a bullet or
    ending in an ellipsis, share of words with a letter, and duplicated lines / paragraphs /
    n-grams."""

    enabled: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_avg_word_length: float = 3.0
    max_avg_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    repetition: bool = True


@dataclass
class CurateConfig:
    """See the module docstring."""

    inputs: list[str] = field(default_factory=list)
    output_dir: str = "data/curated"
    text_key: str = "text"
    tokenizer: str = ""
    eod_token: str = ""
    workers: int = 2
    tasks: int = 0  # shards per step (0 = workers); a killed run skips the finished ones
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)


def validate_curate(cfg: CurateConfig) -> list[str]:
    """Every problem of a curation config, as 'key: what and the fix'."""
    from pathlib import Path

    problems = []
    if not cfg.inputs:
        problems.append("inputs: empty; list the folders of raw documents (.jsonl, .txt, .md, .html, .pdf)")
    for i, folder in enumerate(cfg.inputs):
        if not Path(folder).is_dir():
            problems.append(f"inputs[{i}]: {folder!r} is not a folder")
    if cfg.workers < 1:
        problems.append(f"workers: must be >= 1, got {cfg.workers}")
    if cfg.tasks < 0:
        problems.append(f"tasks: must be >= 0 (0 = workers), got {cfg.tasks}")
    if cfg.exact_dedup.unit not in ("lines", "sentences"):
        problems.append(f"exact_dedup.unit: {cfg.exact_dedup.unit!r}; choose lines or sentences")
    if cfg.exact_dedup.span < 1:
        problems.append(f"exact_dedup.span: must be >= 1, got {cfg.exact_dedup.span}")
    for key in ("n_grams", "bands", "rows"):
        if getattr(cfg.near_dedup, key) < 1:
            problems.append(f"near_dedup.{key}: must be >= 1, got {getattr(cfg.near_dedup, key)}")
    unknown = [t for t in cfg.pii.types if t not in PII_TYPES]
    if unknown:
        problems.append(f"pii.types: unknown {', '.join(unknown)}; choose from {', '.join(PII_TYPES)}")
    if cfg.quality.min_words > cfg.quality.max_words:
        problems.append(f"quality.min_words ({cfg.quality.min_words}) > quality.max_words ({cfg.quality.max_words})")
    return problems


def load_curate_config(path: str, overrides: list[str] | None = None) -> CurateConfig:
    """Read, override (`key.sub=value`) and validate a curation config; ConfigError lists every problem."""
    from megatron_domain.config import apply_overrides

    cfg = build_dataclass(CurateConfig, apply_overrides(load_yaml(path), overrides or []), path)
    problems = validate_curate(cfg)
    if problems:
        raise ConfigError(problems, path)
    return cfg
