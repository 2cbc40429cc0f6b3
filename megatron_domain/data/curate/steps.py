"""The curation steps datatrove lacks, as datatrove PipelineSteps (so its executors shard,
parallelise and resume them like its own):

- `RawDocumentReader`: folders of .jsonl (a configurable text field), .txt, .md, .html / .htm
  (main content by trafilatura) and .pdf (the text layer by pypdf). Every document gets an id
  (`<path relative to its input>#<index>`) and its source path. A file or line that cannot be
  read, an empty document, a PDF without a text layer or an unsupported extension is counted and
  written, with the reason, to `<problems_dir>/<rank>.jsonl`; the other documents go on.
- `TextCleaner`: Unicode NFC normalization and whitespace cleanup (trailing spaces, runs of
  spaces and tabs inside lines unless `cleanup.collapse_spaces: false`, more than two newlines;
  indentation is kept); a document left empty is dropped and counted.
- `PiiRedactor`: curate/pii.py's typed placeholders, counted per type.
- `QualityScorer`, `QualityThreshold`, `QualityClassifierFilter`: the fastText classifier's
  P(in-domain) per document (curate/quality_model.py), the score below which the lowest
  `drop_fraction` lie (over every shard's scores), and the filter that drops them.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.utils.word_tokenizers import WordTokenizer, simple_span_tokenize

from megatron_domain.data.curate.pii import PII_TYPES, redact

WORD = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]+")
SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)]*\s+")


class RegexWordTokenizer(WordTokenizer):
    """Words (letters/digits with inner apostrophes or hyphens) and runs of punctuation by
    one regular expression; sentences end at . ! ? before whitespace. datatrove's English
    tokenizer is spaCy's, which created a vocabulary entry per new word form and made MinHash
    and the Gopher filters run at ~0.05 MB/s per process here (tools/bench_curate.py); this one
    is ~50x faster and splits English text the same way for these counts (word n-grams, word
    lengths, stop words). `word_tokenizer: spacy` in the config brings datatrove's back (for
    languages where words are not separated by spaces, use it)."""

    def __init__(self):
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        """The words and punctuation marks of `text`."""
        return WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        """The sentences of `text`, stripped, empty ones dropped."""
        return [s.strip() for s in SENTENCE_END.split(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        """(start, end) of each sentence."""
        return list(simple_span_tokenize(text, self.sent_tokenize(text)))


TEXT_EXTENSIONS = (".txt", ".md")
HTML_EXTENSIONS = (".html", ".htm")
SUPPORTED_EXTENSIONS = (".jsonl",) + TEXT_EXTENSIONS + HTML_EXTENSIONS + (".pdf",)


def html_main_text(html: str) -> str:
    """The main content of an HTML page (trafilatura; no comments, tables kept), '' if none."""
    import trafilatura

    return trafilatura.extract(html, include_comments=False, include_tables=True, favor_recall=True) or ""


def pdf_text(path: Path) -> str:
    """The text layer of a PDF, page after page ('' for a scanned PDF without one)."""
    from pypdf import PdfReader

    pages = [page.extract_text() or "" for page in PdfReader(str(path)).pages]
    return "\n\n".join(p.strip() for p in pages if p.strip())


class RawDocumentReader(BaseDiskReader):
    """Documents of every supported file under `data_folder` (see the module docstring)."""

    name = "📖 raw documents"

    def __init__(self, data_folder: str, problems_dir: str, text_key: str = "text"):
        super().__init__(data_folder, text_key=text_key, recursive=True, add_file_path=False)
        self.root = Path(data_folder)
        self.problems_dir = Path(problems_dir)
        self._problems = None

    def problem(self, path: str, reason: str, line: int | None = None) -> None:
        """Count a skipped input and record where and why."""
        self.stat_update(f"skipped_{reason.split(':')[0].replace(' ', '_')}")
        record = {"path": str(self.root / path), "reason": reason, **({"line": line} if line is not None else {})}
        self._problems.write(json.dumps(record) + "\n")
        self._problems.flush()

    def document(self, text: str, path: str, index: int, kind: str, extra: dict | None = None) -> Document | None:
        """A Document with id and source, or None (counted) when the text is empty."""
        if not text.strip():
            self.problem(path, f"empty document: no text after {kind} extraction", index if kind == "jsonl" else None)
            return None
        return Document(text=text, id=f"{path}#{index}",
                        metadata={"source": str(self.root / path), "format": kind, **(extra or {})})

    def read_file(self, filepath: str) -> DocumentsPipeline:
        """The documents of one file (none, and a recorded problem, when it cannot be read)."""
        suffix = Path(filepath).suffix.lower()
        full = self.root / filepath
        try:
            if suffix == ".jsonl":
                yield from self.read_jsonl(filepath, full)
                return
            if suffix in TEXT_EXTENSIONS:
                doc = self.document(full.read_text(encoding="utf-8"), filepath, 0, suffix[1:])
            elif suffix in HTML_EXTENSIONS:
                doc = self.document(html_main_text(full.read_text(encoding="utf-8", errors="replace")), filepath, 0,
                                    "html")
            elif suffix == ".pdf":
                text = pdf_text(full)
                if not text:
                    self.problem(filepath, "pdf without a text layer: scanned? run an OCR tool first (README)")
                    return
                doc = self.document(text, filepath, 0, "pdf")
            else:
                self.problem(filepath, f"unsupported extension: {suffix or '(none)'}; supported: "
                                       f"{', '.join(SUPPORTED_EXTENSIONS)}")
                return
        except Exception as exc:  # any unreadable file is recorded and skipped, never fatal
            self.problem(filepath, f"unreadable: {type(exc).__name__}: {exc}")
            return
        if doc is not None:
            yield doc

    def read_jsonl(self, filepath: str, full: Path) -> DocumentsPipeline:
        """One document per JSON line with a string `text_key`; bad lines are recorded and skipped."""
        with full.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    self.problem(filepath, f"invalid json: {exc.msg}", number)
                    continue
                if not isinstance(record, dict) or not isinstance(record.get(self.text_key), str):
                    self.problem(filepath, f"no text: expected an object with a string {self.text_key!r}", number)
                    continue
                extra = {k: v for k, v in record.items() if k != self.text_key and isinstance(v, (str, int, float))}
                doc = self.document(record[self.text_key], filepath, number, "jsonl", {"fields": extra} if extra else None)
                if doc is not None:
                    yield doc

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """This rank's share of the files; problems go to `<problems_dir>/<rank>.jsonl`."""
        self.problems_dir.mkdir(parents=True, exist_ok=True)
        with (self.problems_dir / f"{rank:05d}.jsonl").open("w") as self._problems:
            yield from super().run(data, rank, world_size)


SPACES = re.compile(r"[ \t]+")
BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str, collapse_spaces: bool = True) -> str:
    """NFC, no carriage returns or no-break spaces, no trailing spaces, at most one blank line;
    with `collapse_spaces` each run of spaces and tabs inside a line becomes one space (a line's
    leading indentation is kept either way: code keeps its structure)."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    lines = []
    for line in text.split("\n"):
        line = line.rstrip()
        if collapse_spaces:
            body = line.lstrip(" \t")
            line = line[:len(line) - len(body)] + SPACES.sub(" ", body)
        lines.append(line)
    return BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n")


class TextCleaner(PipelineStep):
    """Unicode / whitespace cleanup; empty results are dropped (counted as `dropped_empty`)."""

    name = "🧹 clean text"
    type = "✂️ - FORMAT"

    def __init__(self, collapse_spaces: bool = True):
        super().__init__()
        self.collapse_spaces = collapse_spaces

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Clean every document."""
        for doc in data:
            with self.track_time():
                doc.text = clean_text(doc.text, self.collapse_spaces)
            if not doc.text:
                self.stat_update("dropped_empty")
                continue
            self.stat_update("forwarded")
            yield doc


class PiiRedactor(PipelineStep):
    """Typed placeholders for the enabled PII types, then (with `ner_model`) for the named
    entities of a spaCy pipeline (curate/ner.py); counts per type (`pii_<type>`) and the number
    of documents with any PII (`documents_with_pii`)."""

    name = "🔒 PII redaction"
    type = "✂️ - FORMAT"

    def __init__(self, types: list[str] | tuple[str, ...] = PII_TYPES, ner_model: str = "",
                 ner_labels: dict[str, str] | None = None):
        super().__init__()
        self.types = tuple(types)
        self.ner_model = ner_model
        self.ner_labels = ner_labels

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Redact every document."""
        ner = None
        if self.ner_model:
            from megatron_domain.data.curate.ner import NerRedactor

            ner = NerRedactor(self.ner_model, self.ner_labels)
        for doc in data:
            with self.track_time():
                doc.text, counts = redact(doc.text, self.types)
                if ner is not None:
                    doc.text, entities = ner.redact(doc.text)
                    counts = {**counts, **entities}
            for kind, count in counts.items():
                self.stat_update(f"pii_{kind}", value=count)
            if counts:
                self.stat_update("documents_with_pii")
            yield doc


class QualityScorer(PipelineStep):
    """Sets `metadata["quality_score"]` = the classifier's P(in-domain) and writes this rank's
    scores, one per line, to `<scores_dir>/<rank>.txt` (rewritten whole when a shard reruns)."""

    name = "🤖 quality score"
    type = "📊 - STATS"

    def __init__(self, classifier: str, scores_dir: str, batch_size: int = 256):
        super().__init__()
        self.classifier = classifier
        self.scores_dir = Path(scores_dir)
        self.batch_size = batch_size

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Score every document, in batches."""
        from datatrove.utils.batching import batched

        from megatron_domain.data.curate.quality_model import QualityModel

        model = QualityModel(self.classifier)
        self.scores_dir.mkdir(parents=True, exist_ok=True)
        final = self.scores_dir / f"{rank:05d}.txt"
        partial = final.with_suffix(".txt.tmp")
        with partial.open("w") as scores:
            for batch in batched(data, self.batch_size):
                with self.track_time():
                    values = model.score([doc.text for doc in batch])
                for doc, value in zip(batch, values):
                    doc.metadata["quality_score"] = value
                    scores.write(f"{value:.6f}\n")
                    self.stat_update("scored")
                    yield doc
        partial.replace(final)


def read_scores(scores_dir: Path) -> list[float]:
    """Every score the QualityScorer shards wrote."""
    return [float(line) for path in sorted(scores_dir.glob("*.txt")) for line in path.read_text().split()]


class QualityThreshold(PipelineStep):
    """One task: the `drop_fraction` quantile of all scores, written to `threshold_file` as
    {threshold, drop_fraction, documents}."""

    name = "📏 quality threshold"
    type = "📊 - STATS"

    def __init__(self, scores_dir: str, drop_fraction: float, threshold_file: str):
        super().__init__()
        self.scores_dir = Path(scores_dir)
        self.drop_fraction = drop_fraction
        self.threshold_file = threshold_file

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Compute and write the threshold (no documents flow through this step)."""
        import numpy as np

        from megatron_domain.files import write_json_atomic

        scores = read_scores(self.scores_dir)
        threshold = float(np.quantile(scores, self.drop_fraction)) if scores and self.drop_fraction > 0 else 0.0
        write_json_atomic(self.threshold_file, {"threshold": threshold, "drop_fraction": self.drop_fraction,
                                                "documents": len(scores)})
        return
        yield


class QualityClassifierFilter(BaseFilter):
    """Drops the documents whose `quality_score` lies below the threshold in `threshold_file`
    (reason `below_quality_threshold`)."""

    name = "🤖 quality classifier"

    def __init__(self, threshold_file: str, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.threshold_file = threshold_file
        self._threshold: float | None = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Keep a document scored at or above the threshold."""
        if self._threshold is None:
            self._threshold = json.loads(Path(self.threshold_file).read_text())["threshold"]
        if doc.metadata["quality_score"] < self._threshold:
            return False, "below_quality_threshold"
        return True
