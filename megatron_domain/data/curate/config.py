"""The `mdt data curate` configuration (YAML):

    inputs: [data/raw/manuals, data/raw/tickets]   # folders (every supported file below them)
    output_dir: data/curated
    text_key: text                                 # the field of .jsonl records
    tokenizer: /models/Llama-3.1-8B                # optional: also write the indexed dataset
    workers: 2                                     # processes on this machine
    exact_dedup: {enabled: true, unit: lines, span: 1, min_span_words: 10}
    near_dedup: {enabled: true, n_grams: 5, bands: 30, rows: 10}
    pii: {enabled: true, types: [email, phone, ip, credit_card, iban, national_id]}
    quality: {enabled: true, min_words: 50, max_words: 100000, max_symbol_word_ratio: 0.1, ...,
              classifier: quality.bin, drop_fraction: 0.25}     # `mdt data train-quality`
    executor: local                                # or slurm (slurm: {...}) or ray (ray: {...})
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_domain.config import ConfigError, build_dataclass, load_yaml
from megatron_domain.data.curate.pii import PII_TYPES

EXECUTORS = ("local", "slurm", "ray")


@dataclass
class CleanupConfig:
    """Unicode NFC and whitespace cleanup (curate/steps.py clean_text): `collapse_spaces` turns
    runs of spaces inside a line into one (false keeps aligned code and tables as they are)."""

    collapse_spaces: bool = True


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
    """Pattern-based PII redaction (curate/pii.py): typed placeholders for the listed types;
    with `ner_model` (an installed spaCy pipeline or a saved one's folder, curate/ner.py) also
    the named entities whose spaCy label `ner_labels` maps to a placeholder type."""

    enabled: bool = True
    types: list[str] = field(default_factory=lambda: list(PII_TYPES))
    ner_model: str = ""
    ner_labels: dict = field(default_factory=lambda: {"PERSON": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION",
                                                      "FAC": "ADDRESS"})


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
    # the fastText classifier (`mdt data train-quality`): when set, every document the heuristics
    # kept is scored with P(in-domain) and the lowest `drop_fraction` of them are dropped
    classifier: str = ""
    drop_fraction: float = 0.25


@dataclass
class SlurmConfig:
    """datatrove's SlurmPipelineExecutor: one job array per phase, each phase depending on the
    one before; `env_command` activates the environment on the nodes (e.g. `source .venv/bin/activate`)."""

    partition: str = ""
    time: str = "04:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    qos: str = ""
    env_command: str = ""
    sbatch_args: dict = field(default_factory=dict)


@dataclass
class RayConfig:
    """datatrove's RayPipelineExecutor: `address` of a running cluster ("" = start a local one,
    `auto` = the cluster this machine belongs to)."""

    address: str = ""
    cpus_per_task: int = 1
    mem_per_cpu_gb: float = 2.0


@dataclass
class CurateConfig:
    """See the module docstring."""

    inputs: list[str] = field(default_factory=list)
    output_dir: str = "data/curated"
    text_key: str = "text"
    tokenizer: str = ""
    eod_token: str = ""
    output_prefix: str = ""  # the indexed dataset (with `tokenizer`); default <output_dir>/corpus
    workers: int = 2
    tasks: int = 0  # shards per step (0 = workers); a killed run skips the finished ones
    executor: str = "local"  # local (worker processes), slurm or ray
    # words for dedup and the Gopher filters: `regex` (fast, for space-separated languages) or
    # `spacy` (datatrove's per-language tokenizer for `language`; ~5-10x slower here)
    word_tokenizer: str = "regex"
    language: str = "en"
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    cleanup: CleanupConfig = field(default_factory=CleanupConfig)
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
    if cfg.word_tokenizer not in ("regex", "spacy"):
        problems.append(f"word_tokenizer: {cfg.word_tokenizer!r}; choose regex or spacy")
    if cfg.executor not in EXECUTORS:
        problems.append(f"executor: {cfg.executor!r}; choose from {', '.join(EXECUTORS)}")
    if cfg.executor == "slurm" and not cfg.slurm.partition:
        problems.append("slurm.partition: empty; name the partition the jobs go to")
    if cfg.quality.classifier and not Path(cfg.quality.classifier).is_file():
        problems.append(f"quality.classifier: {cfg.quality.classifier!r} is not a file; train one with "
                        "`mdt data train-quality` or leave it empty")
    if not 0 <= cfg.quality.drop_fraction < 1:
        problems.append(f"quality.drop_fraction: must be in [0, 1), got {cfg.quality.drop_fraction}")
    if cfg.pii.enabled and cfg.pii.ner_model:
        from megatron_domain.data.curate.ner import check_ner_model

        problem = check_ner_model(cfg.pii.ner_model)
        if problem:
            problems.append(f"pii.ner_model: {problem}")
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
